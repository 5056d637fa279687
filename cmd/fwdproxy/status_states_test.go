package main

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

// The status an operator reads during a partition: each member's state, how long it has been
// in it, and the problems that keep the instance from being converged.
func TestStatusShowsMemberStatesAndProblems(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	st := &admin.Status{
		Node: "c", Gossip: true, Leader: true, Digest: "d1", Entries: 4, Ready: true, ReadyReason: "ready",
		Members: []peers.Member{
			{Name: "c", Addr: "10.0.0.13:7946", State: peers.StateAlive, Digest: "d1", Leader: true},
			{Name: "d", Addr: "10.0.0.14:7946", State: peers.StateSuspect, Digest: "d1", Since: now.Add(-2 * time.Second)},
			{Name: "a", Addr: "10.0.0.11:7946", State: peers.StateDead, Digest: "d1", Since: now.Add(-7 * time.Second)},
			{Name: "b", Addr: "10.0.0.12:7946", State: peers.StateLeft, Digest: "d0", Since: now.Add(-time.Minute)},
		},
		Fleet: &peers.Health{Synced: true, PartitionSuspected: true, Alive: 1, Suspect: 1, Dead: 1, Left: 1,
			Problems: []string{"member a (10.0.0.11:7946) is dead since 2026-12-01T11:59:53Z", "partition suspected: 1 of 3 known members unreachable"}},
	}
	var out bytes.Buffer
	printStatus(&out, st, now)
	// Compared by fields: the column widths are tabwriter's.
	var lines []string
	for _, l := range strings.Split(out.String(), "\n") {
		lines = append(lines, strings.Join(strings.Fields(l), " "))
	}
	for _, want := range []string{
		"converged: no",
		"fleet problem: partition suspected: 1 of 3 known members unreachable",
		"MEMBER ADDRESS STATE DIGEST SAME LEADER",
		"d 10.0.0.14:7946 suspect for 2s d1 yes no",
		"a 10.0.0.11:7946 dead for 7s d1 - no",
		"b 10.0.0.12:7946 left for 1m0s d0 - no",
	} {
		if !slices.Contains(lines, want) {
			t.Errorf("status lacks the line %q:\n%s", want, out.String())
		}
	}
}

package peers

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

func memberState(n *Node, name string) string {
	for _, m := range n.Members() {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

// A peer whose seeds never answer holds nothing of the fleet: it is neither synced nor
// converged, and its store sources do not report (so the daemon is not ready).
func TestUnreachableSeedsNotSyncedNorConverged(t *testing.T) {
	lone := startPeer(t, "lone", peerOpts{seeds: []string{"127.0.0.1:1"}})
	src := lone.Sources(nil)[0]
	reported := make(chan struct{}, 1)
	ctx := t.Context()
	go src.Run(ctx, func(*catalog.Catalog) { reported <- struct{}{} })
	meshtest.Eventually(t, 5*time.Second, "first join attempt", func() bool { return lone.joinTried.Load() })
	h := lone.Health()
	if h.Synced || h.Converged || !h.Isolated || lone.Converged() {
		t.Fatalf("health %+v; want not synced, not converged, isolated", h)
	}
	if lone.Leader() {
		t.Error("a peer without the fleet's state leads (would run discovery)")
	}
	if got := testutil.ToFloat64(mustGauge(t, lone.reg, "fwdproxy_gossip_converged")); got != 0 {
		t.Errorf("fwdproxy_gossip_converged = %v, want 0", got)
	}
	select {
	case <-reported:
		t.Fatal("the operator source reported before the peer held the fleet's state")
	default:
	}
	// A fleet of one with no seeds is synced at once and reports.
	first := startPeer(t, "first", peerOpts{})
	meshtest.Eventually(t, 5*time.Second, "alone is synced", func() bool { return first.Health().Converged })
}

// A killed member is suspect, then dead; one that closes is left; the minority side of a
// partition says so.
func TestMemberStatesSuspectDeadLeft(t *testing.T) {
	fleet := startFleet(t, 3, peerOpts{})
	meshtest.Eventually(t, 5*time.Second, "synced", func() bool { return converged(fleet) })
	// Partition peer-02 from the others.
	fleet[2].tr.block(fleet[0].tr.Addr(), fleet[1].tr.Addr())
	fleet[0].tr.block(fleet[2].tr.Addr())
	fleet[1].tr.block(fleet[2].tr.Addr())
	sawSuspect := false
	meshtest.Eventually(t, 10*time.Second, "peer-02 declared dead on both sides", func() bool {
		sawSuspect = sawSuspect || memberState(fleet[0].Node, "peer-02") == StateSuspect || memberState(fleet[2].Node, "peer-00") == StateSuspect
		return memberState(fleet[0].Node, "peer-02") == StateDead && memberState(fleet[1].Node, "peer-02") == StateDead &&
			memberState(fleet[2].Node, "peer-00") == StateDead && memberState(fleet[2].Node, "peer-01") == StateDead
	})
	if !sawSuspect {
		t.Log("no suspect state observed between alive and dead (suspicion can be shorter than one poll)")
	}
	if h := fleet[2].Health(); !h.PartitionSuspected || !h.Isolated || h.Converged {
		t.Errorf("minority side health %+v; want partition suspected, isolated, not converged", h)
	}
	if h := fleet[0].Health(); h.PartitionSuspected || h.Dead != 1 || !h.Converged {
		t.Errorf("majority side health %+v; want one dead, no partition, converged", h)
	}
	if got := testutil.ToFloat64(mustGauge(t, fleet[2].reg, "fwdproxy_gossip_partition_suspected")); got != 1 {
		t.Errorf("fwdproxy_gossip_partition_suspected = %v, want 1", got)
	}
	fleet[0].tr.unblockAll()
	fleet[1].tr.unblockAll()
	fleet[2].tr.unblockAll()
	meshtest.Eventually(t, 10*time.Second, "healed", func() bool {
		return memberState(fleet[0].Node, "peer-02") == StateAlive && !fleet[2].Health().PartitionSuspected && converged(fleet)
	})
	if err := fleet[1].Close(); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "peer-01 listed as left", func() bool { return memberState(fleet[0].Node, "peer-01") == StateLeft })
	if h := fleet[0].Health(); h.Dead != 0 || h.Left != 1 || !h.Converged {
		t.Errorf("after a graceful leave: %+v; want left 1, dead 0, converged", h)
	}
}

package main

import (
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/admin"
)

// fwdproxy status shows each cluster's connection and since when.
func TestPrintStatusKubernetes(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	st := &admin.Status{Node: "n1", Ready: true, ReadyReason: "serving", Kubernetes: []admin.KubernetesSource{
		{Source: "kubernetes:east", Running: true, Connected: true, Since: now.Add(-time.Hour)},
		{Source: "kubernetes:west", Running: true, Since: now.Add(-13 * time.Second), LastError: "watch pods in all namespaces: connection refused"},
		{Source: "kubernetes:south"},
	}}
	var b strings.Builder
	printStatus(&b, st, now)
	out := b.String()
	for _, want := range []string{
		"kubernetes:east:   connected since 2026-01-02T02:04:05Z (1h0m0s)",
		"kubernetes:west:   DISCONNECTED since 2026-01-02T03:03:52Z (13s), serving the last good catalog: watch pods in all namespaces: connection refused",
		"kubernetes:south:  not watched by this instance",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}

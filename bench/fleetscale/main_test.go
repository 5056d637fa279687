package main

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

// The test binary doubles as the instances' program, as the benchmark's binary does.
func TestMain(m *testing.M) {
	if cfg := os.Getenv(instanceEnv); cfg != "" {
		os.Exit(runInstance(cfg))
	}
	os.Exit(m.Run())
}

// TestSmallFleet runs the benchmark's harness at a small size: three instances gossiping on
// loopback, each change applied on one of them reaching every instance's stand-in data plane.
func TestSmallFleet(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out strings.Builder
	res, err := run(ctx, options{instances: 3, services: 20, changes: 3, timing: "local", timeout: time.Minute, startBatch: 2, profile: -1, minFreeMiB: 512, settleCores: 1, out: &out, progress: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	if res.idle <= 0 || res.idle >= 1 {
		t.Fatalf("settled at %.3f cores, want a measured rate under -settle-cores 1", res.idle)
	}
	if len(res.fleet) != 3 || len(res.perInst) != 3 {
		t.Fatalf("measured %d changes (%d with per-instance times), want 3", len(res.fleet), len(res.perInst))
	}
	for k, acks := range res.perInst {
		if len(acks) != 3 {
			t.Fatalf("change %d: %d instances ACKed, want 3", k, len(acks))
		}
		for i, a := range acks {
			// Both follow the apply (the server records served only after handing the snapshot
			// to its streams, so the ACK may come first).
			if a <= 0 || res.served[k][i] <= 0 {
				t.Fatalf("change %d, instance %d: ACK at %.3fs, served at %.3fs after the apply", k, i, a, res.served[k][i])
			}
		}
	}
	if res.delta < 100 || res.state <= float64(res.delta) || res.lost != 0 {
		t.Fatalf("delta %d bytes, state %.0f bytes, %d xDS streams lost", res.delta, res.state, res.lost)
	}
	// Each change gives one service (two ports, so two clusters) a new identity.
	if res.sent["cluster"] < 2 {
		t.Fatalf("clusters sent per change and instance: %v, want at least 2 (%v)", res.sent["cluster"], res.sent)
	}
	for i, r := range res.rss {
		if r <= 0 || res.hwm[i] < r || res.rssGC[i] <= 0 || res.rssGC[i] > res.hwm[i] {
			t.Fatalf("instance %d: RSS %.0f MiB, after GC %.0f MiB, peak %.0f MiB", i, r, res.rssGC[i], res.hwm[i])
		}
	}
	if !strings.Contains(out.String(), "| apply -> every instance's data plane ACKed (per change) |") {
		t.Fatalf("report:\n%s", out.String())
	}
}

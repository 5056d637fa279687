package peers

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// benchTimings are fast loopback timings that still leave two shared cores for 32 peers.
func benchTimings(c *memberlist.Config) {
	c.GossipInterval = 50 * time.Millisecond
	c.ProbeInterval = 500 * time.Millisecond
	c.ProbeTimeout = 200 * time.Millisecond
	c.PushPullInterval = 10 * time.Second // propagation below is by broadcast, not anti-entropy
	c.TCPTimeout = 2 * time.Second
}

func sentBytes(fleet []*testPeer) int64 {
	var n int64
	for _, p := range fleet {
		n += p.tr.sent.Load()
	}
	return n
}

// BenchmarkPropagation32: time from a write on one peer until every one of 32 peers holds it
// (p50/p99 over b.N changes), and gossip bytes sent per node per second, idle and while changing.
func BenchmarkPropagation32(b *testing.B) {
	const size = 32
	fleet := startFleet(b, size, peerOpts{tune: benchTimings})
	meshtest.Eventually(b, 30*time.Second, "converged", func() bool { return converged(fleet) })

	idleFrom, idleStart := sentBytes(fleet), time.Now()
	time.Sleep(3 * time.Second)
	idle := float64(sentBytes(fleet)-idleFrom) / size / time.Since(idleStart).Seconds()

	var lat []time.Duration
	b.ResetTimer()
	from, start := sentBytes(fleet), time.Now()
	for i := range b.N {
		host := fmt.Sprintf("svc%d.default.svc.cluster.local", i%50)
		s := svc(host, uint32(1000+i))
		writer := fleet[rand.N(size)]
		t0 := time.Now()
		if _, err := writer.Apply([]catalog.Service{s}); err != nil {
			b.Fatal(err)
		}
		want, _ := writer.Store().Get(OperatorKey(host))
		for _, p := range fleet {
			for {
				e, ok := p.Store().Get(OperatorKey(host))
				if ok && string(e.Value) == string(want.Value) {
					break
				}
				if time.Since(t0) > 30*time.Second {
					b.Fatalf("change %d not on %s after 30s", i, p.Name())
				}
				time.Sleep(time.Millisecond)
			}
		}
		lat = append(lat, time.Since(t0))
	}
	elapsed := time.Since(start)
	b.StopTimer()
	busy := float64(sentBytes(fleet)-from) / size / elapsed.Seconds()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(idle, "idle-B/node/s")
	b.ReportMetric(busy, "changing-B/node/s")
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "changes/s")
}

// BenchmarkJoin10k: a new peer joins a fleet holding 10,000 entries and receives all of them.
func BenchmarkJoin10k(b *testing.B) {
	fleet := startFleet(b, 3, peerOpts{tune: benchTimings})
	var svcs []catalog.Service
	for i := range 10000 {
		svcs = append(svcs, svc(fmt.Sprintf("svc%05d.default.svc.cluster.local", i), 8000))
	}
	if _, err := fleet[0].Apply(svcs); err != nil {
		b.Fatal(err)
	}
	meshtest.Eventually(b, 120*time.Second, "the fleet holds 10,000 entries", func() bool { return converged(fleet) })
	want, n := fleet[0].Digest()
	if n != 10000 {
		b.Fatalf("%d entries", n)
	}
	state := len(encodeMessage(msgState, fleet[0].Store().All()))
	var total time.Duration
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		p := startPeer(b, fmt.Sprintf("joiner-%03d", i), peerOpts{tune: benchTimings, seeds: []string{fleet[i%3].tr.Addr()}})
		meshtest.Eventually(b, 60*time.Second, "the joiner has every entry", func() bool { d, _ := p.Digest(); return d == want })
		total += time.Since(t0)
		b.StopTimer()
		p.kill()
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/join")
	b.ReportMetric(float64(state), "state-bytes")
}

// BenchmarkPushPullHeld10k merges a periodic push/pull's worth of entries the store already
// holds: 10,000 catalog entries, as a peer receives from another every push/pull interval.
func BenchmarkPushPullHeld10k(b *testing.B) {
	validate := CatalogValidator(catalog.Options{})
	writer := NewStore("a", validate, StoreOptions{})
	for j := range 10000 {
		host := fmt.Sprintf("s%d.default.svc.cluster.local", j)
		if _, _, err := writer.Put(OperatorKey(host), serviceJSON(b, host, uint32(1000+j%50000))); err != nil {
			b.Fatal(err)
		}
	}
	all := writer.All()
	s := NewStore("b", validate, StoreOptions{})
	if changed, rejected := s.Merge(all); len(changed) != len(all) || len(rejected) != 0 {
		b.Fatalf("first merge: %d of %d changed, rejected %v", len(changed), len(all), rejected)
	}
	b.ResetTimer()
	for b.Loop() {
		if changed, _ := s.Merge(all); len(changed) != 0 {
			b.Fatalf("%d entries changed on a resend", len(changed))
		}
	}
}

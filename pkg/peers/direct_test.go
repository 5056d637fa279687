package peers

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// noGossip leaves a peer no way to spread a change but the writer's direct send: no gossip
// rounds, and probes (which piggyback broadcasts) and push/pull far beyond the test.
func noGossip(c *memberlist.Config) {
	fastTimings(c)
	c.GossipNodes = 0
	c.ProbeInterval = time.Hour
	c.PushPullInterval = time.Hour
}

// TestLocalChangeGoesStraightToEveryMember: an operator's change reaches every member from the
// writer itself, not only by gossip rounds.
func TestLocalChangeGoesStraightToEveryMember(t *testing.T) {
	fleet := quietFleet(t, 4)
	applyEverywhere(t, fleet, fleet[2], "direct.ns.svc.cluster.local")
}

// quietFleet starts size peers without gossip rounds that all know each other: joining every
// earlier peer exchanges state with each, so all know all without gossip.
func quietFleet(t *testing.T, size int) []*testPeer {
	t.Helper()
	var fleet []*testPeer
	var addrs []string
	for i := range size {
		p := startPeer(t, fmt.Sprintf("peer-%02d", i), peerOpts{tune: noGossip, seeds: addrs})
		fleet = append(fleet, p)
		addrs = append(addrs, p.tr.Addr())
	}
	meshtest.Eventually(t, 20*time.Second, "all peers know each other", func() bool {
		for _, p := range fleet {
			if p.ml.NumMembers() != size {
				return false
			}
		}
		return true
	})
	return fleet
}

// applyEverywhere applies an operator entry for host on writer and waits until every peer of
// fleet holds it.
func applyEverywhere(t *testing.T, fleet []*testPeer, writer *testPeer, host string) {
	t.Helper()
	if _, err := writer.Apply([]catalog.Service{svc(host, 7070)}); err != nil {
		t.Fatal(err)
	}
	want, _ := writer.Store().Get(OperatorKey(host))
	meshtest.Eventually(t, 10*time.Second, "every peer holds the change", func() bool {
		for _, p := range fleet {
			if e, ok := p.Store().Get(OperatorKey(host)); !ok || string(e.Value) != string(want.Value) {
				return false
			}
		}
		return true
	})
}

// TestChangeAfterABurstGoesStraightToEveryMember: a burst (a first discovery) leaves the writer's
// broadcast queue long for minutes; an operator's change written after it still reaches every
// member from the writer in one hop, not behind the burst's gossip.
func TestChangeAfterABurstGoesStraightToEveryMember(t *testing.T) {
	fleet := quietFleet(t, 3)
	// No state exchange either: what reaches the others is what the writer sends directly.
	fleet[0].mu.Lock()
	fleet[0].lastExchange = time.Now().Add(time.Hour)
	fleet[0].mu.Unlock()
	burst := &catalog.Catalog{}
	for i := range 4 * maxDirectEntries {
		burst.Services = append(burst.Services, svc(fmt.Sprintf("svc-%03d.ns.svc.cluster.local", i), 8080))
	}
	fleet[0].SetDiscovered("file", burst)
	if q := fleet[0].queue.NumQueued(); q <= maxDirectEntries {
		t.Fatalf("the burst left %d broadcasts queued; the test needs more than %d", q, maxDirectEntries)
	}
	applyEverywhere(t, fleet, fleet[0], "after-burst.ns.svc.cluster.local")
}

// TestOnlyABurstIsExchangedWithEveryMember: a queue overflowing with relays or with the single
// changes that follow a burst is pruned; only this peer's own burst (a write larger than what
// goes direct) is also pushed and pulled with every member at once, and so reaches them without
// gossip rounds.
func TestOnlyABurstIsExchangedWithEveryMember(t *testing.T) {
	a := startPeer(t, "peer-00", peerOpts{tune: noGossip})
	b := startPeer(t, "peer-01", peerOpts{tune: noGossip, seeds: []string{a.tr.Addr()}})
	meshtest.Eventually(t, 20*time.Second, "the peers know each other", func() bool {
		return a.ml.NumMembers() == 2 && b.ml.NumMembers() == 2
	})
	ctx := context.Background()
	sinceLast := func() { a.mu.Lock(); a.lastExchange = time.Time{}; a.mu.Unlock() }

	exchanges := int64(0)
	burst := func(size int) {
		t.Helper()
		c := &catalog.Catalog{}
		for i := range size {
			c.Services = append(c.Services, svc(fmt.Sprintf("svc-%05d.ns.svc.cluster.local", i), 8080))
		}
		src := fmt.Sprintf("file-%d", size)
		a.SetDiscovered(src, c)
		sinceLast()
		a.boundQueue(ctx)
		if exchanges++; a.exchanges.Load() != exchanges {
			t.Fatalf("a burst of %d entries: %d state exchanges in all, want %d", size, a.exchanges.Load(), exchanges)
		}
		// Only the first maxDirectEntries went direct, and there are no gossip rounds.
		meshtest.Eventually(t, 20*time.Second, "the other member holds the burst", func() bool {
			return len(b.Store().Live(discoveredPrefix(src))) == size
		})
	}
	// This peer's own burst, small enough for the queue: exchanged at once.
	burst(maxDirectEntries + 10)
	if q := a.queue.NumQueued(); q > maxQueued {
		t.Fatalf("the test needs the queue within its bound here; it holds %d", q)
	}

	// Relays of a peer's writes overflow the queue: pruned, not exchanged.
	var relayed []Entry
	other := NewStore("peer-02", nil, StoreOptions{})
	for i := range maxQueued + 100 {
		e, _, err := other.Put(fmt.Sprintf("relayed/%05d", i), []byte(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		relayed = append(relayed, e)
	}
	a.send(relayed, false)
	sinceLast()
	a.boundQueue(ctx)
	if q := a.queue.NumQueued(); q > maxQueued {
		t.Fatalf("queue left at %d, over %d", q, maxQueued)
	}
	if n := a.exchanges.Load(); n != exchanges {
		t.Fatalf("relays caused %d more state exchanges", n-exchanges)
	}

	// A burst that overflows the queue: exchanged too.
	burst(maxQueued + 100)

	// A change after the bursts goes direct; the full queue it joins is only pruned.
	host := "after-burst.ns.svc.cluster.local"
	if _, err := a.Apply([]catalog.Service{svc(host, 7070)}); err != nil {
		t.Fatal(err)
	}
	sinceLast()
	a.boundQueue(ctx)
	if n := a.exchanges.Load(); n != exchanges {
		t.Fatalf("a single change after the bursts caused another state exchange (%d in all)", n)
	}
}

// TestCompressingAndPlainPeersInteroperate: an instance of a release that compressed its gossip
// and one that does not exchange state on join, and each one's change reaches the other, both
// by its direct send and by push/pull.
func TestCompressingAndPlainPeersInteroperate(t *testing.T) {
	compressing := func(c *memberlist.Config) { noGossip(c); c.EnableCompression = true }
	a := startPeer(t, "peer-00", peerOpts{tune: compressing})
	if _, err := a.Apply([]catalog.Service{svc("before-join.ns.svc.cluster.local", 7070)}); err != nil {
		t.Fatal(err)
	}
	b := startPeer(t, "peer-01", peerOpts{tune: noGossip, seeds: []string{a.tr.Addr()}})
	holds := func(p *testPeer, host string) bool { _, ok := p.Store().Get(OperatorKey(host)); return ok }
	meshtest.Eventually(t, 20*time.Second, "the plain peer holds the compressing one's state after joining", func() bool {
		return a.ml.NumMembers() == 2 && b.ml.NumMembers() == 2 && holds(b, "before-join.ns.svc.cluster.local")
	})
	for _, w := range []struct {
		from, to *testPeer
		host     string
	}{{a, b, "from-compressing.ns.svc.cluster.local"}, {b, a, "from-plain.ns.svc.cluster.local"}} {
		if _, err := w.from.Apply([]catalog.Service{svc(w.host, 7071)}); err != nil {
			t.Fatal(err)
		}
		meshtest.Eventually(t, 10*time.Second, w.host+" arrives", func() bool { return holds(w.to, w.host) })
	}
}

package peers

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// fast timings for loopback tests: failure detection in about a second.
func fastTimings(c *memberlist.Config) {
	c.GossipInterval = 20 * time.Millisecond
	c.ProbeInterval = 100 * time.Millisecond
	c.ProbeTimeout = 50 * time.Millisecond
	c.PushPullInterval = 500 * time.Millisecond
	c.SuspicionMult = 2
	c.GossipToTheDeadTime = time.Second
	c.TCPTimeout = 500 * time.Millisecond
}

type testPeer struct {
	*Node
	tr  *faultyTransport
	reg *prometheus.Registry
	log *meshtest.SyncBuffer
}

type peerOpts struct {
	keys  [][]byte
	seeds []string
	tune  func(*memberlist.Config)
}

func startPeer(tb testing.TB, name string, o peerOpts) *testPeer {
	tb.Helper()
	tr, err := newFaultyTransport()
	if err != nil {
		tb.Fatal(err)
	}
	buf := &meshtest.SyncBuffer{}
	reg := prometheus.NewRegistry()
	tune := o.tune
	if tune == nil {
		tune = fastTimings
	}
	n, err := Start(Config{
		Name: name, Bind: "127.0.0.1:0", Seeds: o.seeds, Keys: o.keys, Profile: "local",
		Tune: tune, Transport: tr, RejoinInterval: 300 * time.Millisecond,
		Log:        slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelInfo})),
		Registerer: reg,
	})
	if err != nil {
		tr.Shutdown()
		tb.Fatal(err)
	}
	p := &testPeer{Node: n, tr: tr, reg: reg, log: buf}
	tb.Cleanup(func() { p.kill() })
	return p
}

// kill stops a peer without leaving: the others must detect the failure.
func (p *testPeer) kill() {
	if p.closed.Swap(true) {
		return
	}
	p.cancel()
	<-p.done
	p.ml.Shutdown()
}

func startFleet(tb testing.TB, size int, o peerOpts) []*testPeer {
	tb.Helper()
	var fleet []*testPeer
	for i := range size {
		oo := o
		if i > 0 {
			oo.seeds = []string{fleet[0].tr.Addr()}
		}
		fleet = append(fleet, startPeer(tb, fmt.Sprintf("peer-%02d", i), oo))
	}
	meshtest.Eventually(tb, time.Duration(10+size)*time.Second, "all peers see each other", func() bool {
		for _, p := range fleet {
			if p.ml.NumMembers() != size {
				if testing.Verbose() {
					tb.Logf("%s sees %d", p.Name(), p.ml.NumMembers())
				}
				return false
			}
		}
		return true
	})
	return fleet
}

// converged: every peer has the same digest, and every peer sees every other advertise it.
func converged(fleet []*testPeer) bool {
	want, _ := fleet[0].Digest()
	for _, p := range fleet {
		if d, _ := p.Digest(); d != want || !p.Converged() {
			return false
		}
	}
	return true
}

func svc(host string, port uint32) catalog.Service {
	return catalog.Service{
		Host:       host,
		Ports:      []catalog.Port{{Number: port, Protocol: catalog.HTTP}},
		Identities: []string{"spiffe://cluster.local/ns/default/sa/" + strings.Split(host, ".")[0]},
	}
}

func hosts(n *Node) []string {
	var out []string
	for _, s := range n.OperatorServices() {
		out = append(out, fmt.Sprintf("%s:%d", s.Host, s.Ports[0].Number))
	}
	return out
}

func TestFivePeersConvergeAndChangesReachAll(t *testing.T) {
	fleet := startFleet(t, 5, peerOpts{})
	meshtest.Eventually(t, 5*time.Second, "empty fleet converged", func() bool { return converged(fleet) })
	empty, _ := fleet[0].Digest()

	if _, err := fleet[3].Apply([]catalog.Service{svc("reviews.default.svc.cluster.local", 9080)}); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "the change is on every peer", func() bool { return converged(fleet) })
	for _, p := range fleet {
		if got := hosts(p.Node); len(got) != 1 || got[0] != "reviews.default.svc.cluster.local:9080" {
			t.Fatalf("%s has %v", p.Name(), got)
		}
	}
	if d, _ := fleet[0].Digest(); d == empty {
		t.Fatal("digest did not change with the contents")
	}

	// An update made on another peer wins (it saw the first write), and a delete reaches all.
	if _, err := fleet[1].Apply([]catalog.Service{svc("reviews.default.svc.cluster.local", 9081)}); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "the update is on every peer", func() bool {
		return converged(fleet) && hosts(fleet[4].Node)[0] == "reviews.default.svc.cluster.local:9081"
	})
	if gone := fleet[4].Delete([]string{"reviews.default.svc.cluster.local"}); len(gone) != 1 {
		t.Fatalf("delete: %v", gone)
	}
	meshtest.Eventually(t, 5*time.Second, "the delete is on every peer", func() bool {
		return converged(fleet) && len(hosts(fleet[0].Node)) == 0
	})
	if d, _ := fleet[2].Digest(); d != empty {
		t.Fatalf("digest after delete %s, want the empty store's %s", d, empty)
	}
	if got := testutil.ToFloat64(mustGauge(t, fleet[2].reg, "fwdproxy_gossip_converged")); got != 1 {
		t.Fatalf("fwdproxy_gossip_converged = %v", got)
	}
	if got := testutil.ToFloat64(mustGauge(t, fleet[2].reg, "fwdproxy_gossip_members")); got != 5 {
		t.Fatalf("fwdproxy_gossip_members = %v", got)
	}
}

// mustGauge finds a registered metric by name and returns it as a collector.
func mustGauge(t *testing.T, reg *prometheus.Registry, name string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.Metric) == 1 {
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: "copy"})
			g.Set(mf.Metric[0].GetGauge().GetValue())
			return g
		}
	}
	t.Fatalf("metric %s not found", name)
	return nil
}

func TestKilledPeerDetectedAndLeadershipMoves(t *testing.T) {
	fleet := startFleet(t, 5, peerOpts{})
	meshtest.Eventually(t, 3*time.Second, "peer-00 leads", func() bool { return fleet[0].Leader() && !fleet[1].Leader() })
	fleet[0].kill() // the leader fails without leaving
	rest := fleet[1:]
	meshtest.Eventually(t, 10*time.Second, "the failure is detected", func() bool {
		for _, p := range rest {
			if p.ml.NumMembers() != 4 {
				return false
			}
		}
		return true
	})
	meshtest.Eventually(t, 3*time.Second, "peer-01 takes over discovery", func() bool {
		leaders := 0
		for _, p := range rest {
			if p.Leader() {
				leaders++
			}
		}
		return rest[0].Leader() && leaders == 1
	})
	// The rest keep serving: a change still reaches every live peer.
	if _, err := rest[2].Apply([]catalog.Service{svc("ratings.default.svc.cluster.local", 9080)}); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "the change is on every live peer", func() bool { return converged(rest) })
}

func TestPartitionHealsWithoutLosingWrites(t *testing.T) {
	fleet := startFleet(t, 5, peerOpts{})
	a, b := fleet[:2], fleet[2:]
	partition := func() {
		for _, x := range a {
			for _, y := range b {
				x.tr.block(y.tr.Addr())
				y.tr.block(x.tr.Addr())
			}
		}
	}
	partition()
	meshtest.Eventually(t, 10*time.Second, "each side sees only itself", func() bool {
		return a[0].ml.NumMembers() == 2 && b[0].ml.NumMembers() == 3
	})
	// Writes on both sides, including the same key on both: the later write must win everywhere.
	apply(t, a[0].Node, []catalog.Service{svc("left.default.svc.cluster.local", 9080)})
	apply(t, b[1].Node, []catalog.Service{svc("right.default.svc.cluster.local", 9080)})
	apply(t, a[1].Node, []catalog.Service{svc("both.default.svc.cluster.local", 1001)})
	first, ok := a[1].Store().Get(OperatorKey("both.default.svc.cluster.local"))
	if !ok {
		t.Fatal("the first write is not in its writer's store")
	}
	// The second write is later by the wall clock, which the hybrid clock stamps in milliseconds.
	meshtest.Eventually(t, time.Second, "the wall clock passes the first write", func() bool { return time.Now().UnixMilli() > first.Time.Wall })
	apply(t, b[2].Node, []catalog.Service{svc("both.default.svc.cluster.local", 1002)})
	gone := a[0].Delete([]string{"left.default.svc.cluster.local"})
	apply(t, a[0].Node, []catalog.Service{svc("left2.default.svc.cluster.local", 9080)})
	if len(gone) != 1 {
		t.Fatal("delete during partition found nothing")
	}
	meshtest.Eventually(t, 5*time.Second, "each side converged alone", func() bool { return converged(a) && converged(b) })
	if da, _ := a[0].Digest(); func() bool { db, _ := b[0].Digest(); return da == db }() {
		t.Fatal("the sides should differ while partitioned")
	}

	for _, p := range fleet {
		p.tr.unblockAll()
	}
	meshtest.Eventually(t, 15*time.Second, "the healed fleet converged", func() bool {
		for _, p := range fleet {
			if p.ml.NumMembers() != 5 {
				return false
			}
		}
		return converged(fleet)
	})
	want := []string{"both.default.svc.cluster.local:1002", "left2.default.svc.cluster.local:9080", "right.default.svc.cluster.local:9080"}
	for _, p := range fleet {
		if got := hosts(p.Node); strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("%s has %v, want %v", p.Name(), got, want)
		}
	}
}

func apply(t *testing.T, n *Node, svcs []catalog.Service) {
	t.Helper()
	if _, err := n.Apply(svcs); err != nil {
		t.Fatal(err)
	}
}

func TestLateJoinerGetsEverything(t *testing.T) {
	fleet := startFleet(t, 3, peerOpts{})
	var svcs []catalog.Service
	for i := range 300 {
		svcs = append(svcs, svc(fmt.Sprintf("svc%03d.default.svc.cluster.local", i), 8000))
	}
	if _, err := fleet[1].Apply(svcs); err != nil {
		t.Fatal(err)
	}
	fleet[1].Delete([]string{"svc000.default.svc.cluster.local"})
	fleet[0].SetDiscovered("file:/etc/fwdproxy/catalog.yaml", &catalog.Catalog{Services: []catalog.Service{svc("found.default.svc.cluster.local", 9090)}})
	meshtest.Eventually(t, 10*time.Second, "the fleet converged", func() bool { return converged(fleet) })

	late := startPeer(t, "peer-99", peerOpts{seeds: []string{fleet[2].tr.Addr()}})
	all := append(fleet, late)
	meshtest.Eventually(t, 10*time.Second, "the late joiner has everything", func() bool { return converged(all) })
	if got := len(late.OperatorServices()); got != 299 {
		t.Fatalf("late joiner has %d operator entries, want 299", got)
	}
	if _, ok := late.Store().Get(DiscoveredKey("file:/etc/fwdproxy/catalog.yaml", "found.default.svc.cluster.local")); !ok {
		t.Fatal("late joiner lacks the discovered service")
	}
	if e, ok := late.Store().All()[0], true; ok && !(e.Deleted && e.Key == OperatorKey("svc000.default.svc.cluster.local")) {
		// The tombstone travels with the state so the delete cannot be undone by an old copy.
		found := false
		for _, e := range late.Store().All() {
			found = found || (e.Deleted && e.Key == OperatorKey("svc000.default.svc.cluster.local"))
		}
		if !found {
			t.Fatal("late joiner did not receive the tombstone")
		}
	}
}

func TestBadGossipRejectedWithoutCrashing(t *testing.T) {
	fleet := startFleet(t, 2, peerOpts{})
	from, to := fleet[0], fleet[1]
	var target *memberlist.Node
	for _, m := range from.memberList() {
		if m.Name == to.Name() {
			target = &m
		}
	}
	good := svc("good.default.svc.cluster.local", 9080)
	goodJSON, _ := json.Marshal(good)
	bad := good
	bad.Host = "bad.default.svc.cluster.local"
	bad.Identities = []string{"not-a-spiffe-id"}
	badJSON, _ := json.Marshal(bad)
	now := time.Now().UnixMilli()
	sends := []struct {
		name   string
		msg    []byte
		reason string
	}{
		{"garbage", []byte("\x01\x01{not json"), "malformed"},
		{"short", []byte{1}, "malformed"},
		{"future version", []byte("\x09\x01{}"), "version"},
		{"unknown field", []byte("\x01\x01{\"e\":[],\"x\":1}"), "malformed"},
		{"oversized", append([]byte("\x01\x01"), bytes.Repeat([]byte(" "), MaxDeltaBytes)...), "oversized"},
		{"invalid service", encodeMessage(msgDelta, []Entry{{Key: OperatorKey(bad.Host), Value: badJSON, Time: Timestamp{Wall: now}, Node: "x"}}), "invalid_entry"},
		{"host mismatch", encodeMessage(msgDelta, []Entry{{Key: OperatorKey("other.default.svc.cluster.local"), Value: goodJSON, Time: Timestamp{Wall: now}, Node: "x"}}), "invalid_entry"},
		{"unknown key", encodeMessage(msgDelta, []Entry{{Key: "zz/x", Value: goodJSON, Time: Timestamp{Wall: now}, Node: "x"}}), "invalid_entry"},
		{"clock skew", encodeMessage(msgDelta, []Entry{{Key: OperatorKey(good.Host), Value: goodJSON, Time: Timestamp{Wall: now + int64(time.Hour/time.Millisecond)}, Node: "x"}}), "clock_skew"},
	}
	for _, s := range sends {
		before := testutil.ToFloat64(to.metrics.rejected.WithLabelValues(s.reason))
		if err := from.ml.SendReliable(target, s.msg); err != nil {
			t.Fatalf("%s: send: %v", s.name, err)
		}
		meshtest.Eventually(t, 3*time.Second, s.name+" rejected as "+s.reason, func() bool {
			return testutil.ToFloat64(to.metrics.rejected.WithLabelValues(s.reason)) > before
		})
	}
	if _, n := to.Digest(); n != 0 {
		t.Fatalf("a rejected entry was applied: %d entries", n)
	}
	// Garbage as a UDP packet too, then the peer still works.
	if err := from.ml.SendBestEffort(target, []byte("\x01\x02garbage")); err != nil {
		t.Fatal(err)
	}
	if _, err := from.Apply([]catalog.Service{good}); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "a good change still arrives", func() bool { return converged(fleet) && len(to.OperatorServices()) == 1 })
}

func TestWrongKeyIsRejectedAndLogged(t *testing.T) {
	k1, k2 := make([]byte, 32), make([]byte, 32)
	k2[0] = 1
	fleet := startFleet(t, 2, peerOpts{keys: [][]byte{k1}})
	intruder := startPeer(t, "peer-50", peerOpts{keys: [][]byte{k2}, seeds: []string{fleet[0].tr.Addr()}})
	meshtest.Eventually(t, 10*time.Second, "the fleet logs the rejection", func() bool {
		return strings.Contains(fleet[0].log.String(), "not encrypted with this fleet's key")
	})
	meshtest.Eventually(t, 10*time.Second, "the intruder logs that it cannot join", func() bool {
		return strings.Contains(intruder.log.String(), "check that peers.keyring matches")
	})
	if fleet[0].ml.NumMembers() != 2 || intruder.ml.NumMembers() != 1 {
		t.Fatalf("members: fleet %d, intruder %d", fleet[0].ml.NumMembers(), intruder.ml.NumMembers())
	}
	if got := testutil.ToFloat64(fleet[0].metrics.rejected.WithLabelValues("encryption")); got == 0 {
		t.Fatal("rejections not counted")
	}
	// A peer whose ring holds the fleet's key first (and a new key staged for rotation) joins.
	friend := startPeer(t, "peer-51", peerOpts{keys: [][]byte{k1, k2}, seeds: []string{fleet[0].tr.Addr()}})
	meshtest.Eventually(t, 10*time.Second, "a peer holding the key joins", func() bool { return friend.ml.NumMembers() == 3 })
}

// Two peers joined by hand (no seeds) are cut apart for longer than memberlist gossips to dead
// members; they still find each other again once the network heals.
func TestLongPartitionHealsWithoutSeeds(t *testing.T) {
	a := startPeer(t, "peer-a", peerOpts{})
	b := startPeer(t, "peer-b", peerOpts{})
	if _, err := b.Join([]string{a.tr.Addr()}); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "joined", func() bool { return a.ml.NumMembers() == 2 && b.ml.NumMembers() == 2 })
	a.tr.block(b.tr.Addr())
	b.tr.block(a.tr.Addr())
	meshtest.Eventually(t, 10*time.Second, "each declares the other dead", func() bool { return a.ml.NumMembers() == 1 && b.ml.NumMembers() == 1 })
	apply(t, a.Node, []catalog.Service{svc("during.default.svc.cluster.local", 9080)})
	time.Sleep(1500 * time.Millisecond) // past GossipToTheDeadTime (1s in fast timings)
	a.tr.unblockAll()
	b.tr.unblockAll()
	meshtest.Eventually(t, 10*time.Second, "the pair is whole and converged again", func() bool {
		return a.ml.NumMembers() == 2 && b.ml.NumMembers() == 2 && converged([]*testPeer{a, b})
	})
	if len(b.OperatorServices()) != 1 {
		t.Fatal("the write made during the partition was lost")
	}
}

func TestLeaderStateWinsOverAStaleWriter(t *testing.T) {
	fleet := startFleet(t, 3, peerOpts{})
	src := "kubernetes:primary"
	meshtest.Eventually(t, 3*time.Second, "peer-00 leads", func() bool { return fleet[0].Leader() })
	fleet[0].SetDiscovered(src, &catalog.Catalog{Services: []catalog.Service{svc("a.default.svc.cluster.local", 80)}})
	if err := fleet[0].SetGateway(Gateway{Name: "primary", Port: 15443, Addresses: []string{"10.0.0.9"}}); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 5*time.Second, "converged", func() bool { return converged(fleet) })
	if g := fleet[2].Gateways(); len(g) != 1 || g[0].Addresses[0] != "10.0.0.9" {
		t.Fatalf("gateways on a follower: %+v", g)
	}
	// A follower that still believes it leads (say, it was cut off) writes its own view later.
	fleet[2].SetDiscovered(src, &catalog.Catalog{Services: []catalog.Service{svc("stale.default.svc.cluster.local", 80)}})
	meshtest.Eventually(t, 5*time.Second, "the leader's view is restored everywhere", func() bool {
		if !converged(fleet) {
			return false
		}
		live := fleet[1].Store().Live(discoveredPrefix(src))
		return len(live) == 1 && live[0].Key == DiscoveredKey(src, "a.default.svc.cluster.local")
	})
}

//go:build linux

package fleet_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
)

// TestFleet runs every scenario in order on one topology: a, b and c are the fleet (a and c with
// the built-in data plane, b with Envoy, so both data planes carry every scenario's traffic);
// d and e are launched by the scale-out scenarios.
func TestFleet(t *testing.T) {
	f := newFleet(t)
	a := f.addInstance("a", 0, "builtin")
	b := f.addInstance("b", 1, "envoy")
	c := f.addInstance("c", 2, "builtin")
	for _, i := range []*instance{a, b, c} {
		i.start()
	}
	for _, i := range []*instance{a, b, c} {
		i.waitReady(60 * time.Second)
		f.register(i.name)
	}
	for _, i := range []*instance{a, b, c} {
		f.waitTarget(i.name, "UP", 20*time.Second)
	}
	meshtest.Eventually(t, 20*time.Second, "fleet converged", func() bool { return f.converged(a, b, c) })
	l := f.startLoad()
	defer l.halt()
	l.waitSent(t, 30)
	t.Cleanup(f.report)

	t.Run("rolling restart", func(t *testing.T) { f.rollingRestart(t, l, a, b, c) })
	t.Run("SIGKILL", func(t *testing.T) { f.sigkill(t, l, b, a, c) })
	t.Run("leader killed during a change", func(t *testing.T) { f.leaderKill(t, l, a, b, c) })
	t.Run("partition", func(t *testing.T) { f.partition(t, l, c, a, b) })
	d := f.addInstance("d", 3, "builtin")
	t.Run("scale-out 10000", func(t *testing.T) { f.scaleOut(t, l, d, a, b, c) })
	e := f.addInstance("e", 4, "builtin")
	t.Run("unreachable new instance", func(t *testing.T) { f.unreachableNewInstance(t, e, a, b, c, d) })
	t.Run("scale-in of the leader", func(t *testing.T) { f.scaleIn(t, l, a, b, c, d) })
}

// converged: every instance converged and advertising the same digest.
func (f *fleet) converged(is ...*instance) bool {
	digest := ""
	for _, i := range is {
		st, err := i.status()
		if err != nil || !st.Converged || len(st.Members) == 0 {
			return false
		}
		if digest == "" {
			digest = st.Digest
		}
		if st.Digest != digest {
			return false
		}
	}
	return true
}

// rollingRestart replaces every instance as instance refresh does with the termination
// lifecycle hook: deregistered (the NLB drains it for the deregistration delay), then stopped
// (SIGTERM: in-flight requests finish, the daemon leaves gossip), started again, and registered
// (healthy after healthy_threshold checks of /ready). Nothing may fail.
func (f *fleet) rollingRestart(t *testing.T, l *load, is ...*instance) {
	from := time.Now()
	var cycles []string
	for _, i := range is {
		// Instance refresh replaces the next instance once the group is healthy again.
		for _, o := range is {
			f.waitTarget(o.name, "UP", 30*time.Second)
		}
		start := time.Now()
		f.deregister(i.name)
		if err := i.terminate(); err != nil {
			t.Errorf("%s: %v", i.name, err)
		}
		i.start()
		i.waitReady(60 * time.Second)
		f.register(i.name)
		f.waitTarget(i.name, "UP", 30*time.Second)
		cycles = append(cycles, fmt.Sprintf("%s %s", i.name, time.Since(start).Round(100*time.Millisecond)))
		l.waitSent(t, 10)
	}
	meshtest.Eventually(t, 30*time.Second, "fleet converged after the restarts", func() bool { return f.converged(is...) })
	w := l.window(from, time.Now())
	f.record("rolling restart (3 instances, lifecycle hook)", w, from, "per instance: "+strings.Join(cycles, ", "))
	if w.failed != 0 {
		t.Errorf("rolling restart: %d of %d failed; first: %v", w.failed, w.sent, w.firstErr)
	}
}

// sigkill kills one instance's host. Only connections it held, or that the NLB sent it before
// its health check saw it fail, may fail; the NLB stops within unhealthy_threshold intervals,
// and gossip declares it dead.
func (f *fleet) sigkill(t *testing.T, l *load, victim *instance, others ...*instance) {
	from := time.Now()
	victim.kill()
	killed := time.Now()
	var nlbDown, gossipDead time.Time
	meshtest.Eventually(t, 60*time.Second, "NLB and gossip notice", func() bool {
		if nlbDown.IsZero() {
			if st, err := f.target(victim.name); err == nil && strings.HasPrefix(st.status, "DOWN") {
				nlbDown = time.Now()
			}
		}
		if gossipDead.IsZero() {
			dead := true
			for _, o := range others {
				st, err := o.status()
				dead = dead && err == nil && memberState(st, victim.name) == "dead"
			}
			if dead {
				gossipDead = time.Now()
			}
		}
		return !nlbDown.IsZero() && !gossipDead.IsZero()
	})
	t.Logf("operator's view from %s:\n%s", others[0].name, others[0].statusText())
	l.waitSent(t, 30)
	// After the NLB took it out (one more interval for checks already under way), nothing fails.
	settled := nlbDown.Add(f.timing.Interval)
	if w := l.window(settled, time.Now()); w.failed != 0 {
		t.Errorf("after the NLB took %s out: %d of %d failed; first: %v", victim.name, w.failed, w.sent, w.firstErr)
	}
	window := f.timing.Interval * time.Duration(f.timing.Unhealthy+1)
	if d := nlbDown.Sub(killed); d > window+f.timing.Interval {
		t.Errorf("NLB took %s to stop sending; its health check allows %s", d, window)
	}
	victim.start()
	victim.waitReady(60 * time.Second)
	f.waitTarget(victim.name, "UP", 30*time.Second)
	meshtest.Eventually(t, 30*time.Second, "fleet converged after the restart", func() bool { return f.converged(append(others, victim)...) })
	w := l.window(from, time.Now())
	f.record("SIGKILL of one instance ("+victim.dataplane+")", w, from,
		fmt.Sprintf("NLB stopped sending after %s (scaled; %s in production); gossip declared it dead after %s",
			nlbDown.Sub(killed).Round(10*time.Millisecond), (nlbDown.Sub(killed)*timeScale).Round(time.Second), gossipDead.Sub(killed).Round(10*time.Millisecond)))
}

// leaderKill kills the leader right after the shared catalog changed, before it can be sure to
// have shared the change: the next leader runs discovery and the change reaches every instance.
func (f *fleet) leaderKill(t *testing.T, l *load, leader *instance, others ...*instance) {
	if st, err := leader.status(); err != nil || !st.Leader {
		t.Fatalf("%s is not the leader: %v", leader.name, err)
	}
	from := time.Now()
	f.writeCatalog(true)
	leader.kill()
	killed := time.Now()
	served := map[string]time.Duration{}
	newLeader, leadAfter := "", time.Duration(0)
	meshtest.Eventually(t, 60*time.Second, "the change on every instance", func() bool {
		for _, o := range others {
			if _, ok := served[o.name]; !ok && f.get(f.vmHTTP(o.host.ip), "added") == nil {
				served[o.name] = time.Since(killed)
			}
			if newLeader == "" {
				if st, err := o.status(); err == nil && st.Leader {
					newLeader, leadAfter = o.name, time.Since(killed)
				}
			}
		}
		return len(served) == len(others) && newLeader != ""
	})
	var last time.Duration
	for _, d := range served {
		last = max(last, d)
	}
	leader.start()
	leader.waitReady(60 * time.Second)
	f.waitTarget(leader.name, "UP", 30*time.Second)
	meshtest.Eventually(t, 30*time.Second, "fleet converged after the restart", func() bool { return f.converged(append(others, leader)...) })
	w := l.window(from, time.Now())
	f.record("leader killed during a catalog change", w, from,
		fmt.Sprintf("%s leads after %s; the change served by every instance after %s", newLeader, leadAfter.Round(10*time.Millisecond), last.Round(10*time.Millisecond)))
	if w.failed > 0 && w.lastFail.After(killed.Add(f.timing.Interval*time.Duration(f.timing.Unhealthy+2))) {
		t.Errorf("failures after the NLB's health-check window: last at %s after the kill", w.lastFail.Sub(killed))
	}
}

// partition cuts one instance off from its peers (not from the NLB or the mesh) while an
// operator applies a change on the other side; it keeps serving its last good configuration,
// and after the heal no write is lost and digests agree.
func (f *fleet) partition(t *testing.T, l *load, cut *instance, others ...*instance) {
	from := time.Now()
	hosts := make([]*host, len(others))
	for k, o := range others {
		hosts[k] = o.host
	}
	if err := cut.host.cutFrom(hosts...); err != nil {
		t.Fatal(err)
	}
	healed := false
	defer func() {
		if !healed {
			_ = cut.host.heal(hosts...)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	doc := "services:\n" + service("ops", httpPort, "http", opsID)
	if _, _, err := others[0].adminClient().Apply(ctx, "ops.yaml", []byte(doc)); err != nil {
		t.Fatal(err)
	}
	var seen time.Duration
	meshtest.Eventually(t, 60*time.Second, "both sides see the partition", func() bool {
		cs, err1 := cut.status()
		os, err2 := others[0].status()
		ok := err1 == nil && err2 == nil && cs.Fleet != nil && cs.Fleet.PartitionSuspected && !cs.Converged &&
			memberState(os, cut.name) == "dead"
		if ok {
			seen = time.Since(from)
		}
		return ok
	})
	t.Logf("operator's view from the cut-off %s:\n%s", cut.name, cut.statusText())
	if v := cut.metric("fwdproxy_gossip_partition_suspected"); v != 1 {
		t.Errorf("%s: fwdproxy_gossip_partition_suspected = %v, want 1", cut.name, v)
	}
	// Cut off, it still serves its last good configuration (and is still ready).
	if err := f.get(f.vmHTTP(cut.host.ip), "web"); err != nil {
		t.Errorf("%s during the partition: %v", cut.name, err)
	}
	if err := cut.host.heal(hosts...); err != nil {
		t.Fatal(err)
	}
	healed = true
	healAt := time.Now()
	meshtest.Eventually(t, 90*time.Second, "converged after the heal", func() bool {
		return f.converged(append(others, cut)...) && f.get(f.vmHTTP(cut.host.ip), "ops") == nil
	})
	converge := time.Since(healAt)
	w := l.window(from, time.Now())
	f.record("one instance partitioned from its peers, change applied meanwhile, healed", w, from,
		fmt.Sprintf("partition seen on both sides after %s; after the heal, the write reached it and digests agreed after %s",
			seen.Round(10*time.Millisecond), converge.Round(10*time.Millisecond)))
	if w.failed != 0 {
		t.Errorf("partition: %d of %d failed; first: %v", w.failed, w.sent, w.firstErr)
	}
}

// bulkCatalog is n operator services.
func bulkCatalog(n int) []byte {
	var b strings.Builder
	b.WriteString("services:\n")
	for k := range n {
		fmt.Fprintf(&b, "  - {host: s%05d.bulk.svc.cluster.local, ports: [{number: %d, protocol: http}], identities: [%s]}\n", k, httpPort, webID)
	}
	return []byte(b.String())
}

// scaleOut launches a new instance into a fleet holding 10,000 entries, registered with the NLB
// at launch as the Auto Scaling group does: it must not be ready, and so must get no traffic,
// before it holds the fleet's full state.
func (f *fleet) scaleOut(t *testing.T, l *load, fresh *instance, fleet ...*instance) {
	const entries = 10000
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	applied := time.Now()
	// One request of 10,000 services: on a busy machine it takes longer than the client's default.
	bulk := fleet[0].adminClient()
	bulk.HTTP = &http.Client{Timeout: 3 * time.Minute}
	if _, _, err := bulk.Apply(ctx, "bulk.yaml", bulkCatalog(entries)); err != nil {
		t.Fatal(err)
	}
	want := 0
	meshtest.Eventually(t, 120*time.Second, "10,000 entries on every instance", func() bool {
		if !f.converged(fleet...) {
			return false
		}
		st, err := fleet[0].status()
		want = st.Entries
		return err == nil && st.Entries >= entries
	})
	spread := time.Since(applied)
	from := time.Now()
	fresh.start()
	f.register(fresh.name)
	var full, ready, traffic time.Time
	meshtest.Eventually(t, 120*time.Second, "the new instance takes traffic", func() bool {
		ok, _ := fresh.ready()
		st, err := fresh.status()
		ts, terr := f.target(fresh.name)
		now := time.Now()
		if err == nil && st.Entries >= want && full.IsZero() {
			full = now
		}
		if ok && ready.IsZero() {
			ready = now
			if err == nil && st.Entries < want {
				t.Errorf("%s answered /ready with %d of the fleet's %d entries", fresh.name, st.Entries, want)
			}
		}
		if terr == nil && ts.sessions > 0 && traffic.IsZero() {
			traffic = now
			if full.IsZero() {
				t.Errorf("the NLB sent %s traffic before it held the fleet's state", fresh.name)
			}
		}
		return !traffic.IsZero()
	})
	meshtest.Eventually(t, 60*time.Second, "fleet converged", func() bool { return f.converged(append(fleet, fresh)...) })
	w := l.window(from, time.Now())
	f.record("scale-out into a fleet of 10,000 entries", w, from,
		fmt.Sprintf("entries spread to 3 instances in %s; the new one held all %d after %s, ready after %s, first traffic after %s",
			spread.Round(100*time.Millisecond), want, full.Sub(from).Round(10*time.Millisecond), ready.Sub(from).Round(10*time.Millisecond), traffic.Sub(from).Round(10*time.Millisecond)))
	if w.failed != 0 {
		t.Errorf("scale-out: %d of %d failed; first: %v", w.failed, w.sent, w.firstErr)
	}
}

// unreachableNewInstance launches an instance that cannot join: first with another gossip key,
// then with the right key but its peers' addresses blocked. Neither may report itself converged
// or ready; once unblocked, it joins (so the negative was the isolation's doing).
func (f *fleet) unreachableNewInstance(t *testing.T, e *instance, fleet ...*instance) {
	rejected := fleet[0].metric(`fwdproxy_gossip_messages_rejected_total{reason="encryption"}`)
	e.keyring = f.writeKeyring("wrong.keys")
	e.start()
	meshtest.Eventually(t, 30*time.Second, "the fleet rejects the wrong key", func() bool {
		return fleet[0].metric(`fwdproxy_gossip_messages_rejected_total{reason="encryption"}`) > rejected
	})
	f.checkNotConverged(t, e, "wrong key")
	e.kill()
	e.keyring = f.keyring
	hosts := make([]*host, len(fleet))
	for k, o := range fleet {
		hosts[k] = o.host
	}
	if err := e.host.cutFrom(hosts...); err != nil {
		t.Fatal(err)
	}
	mark := strings.Count(e.logText(), "cannot reach any peer yet")
	e.start()
	meshtest.Eventually(t, 30*time.Second, "a failed join attempt", func() bool {
		return strings.Count(e.logText(), "cannot reach any peer yet") > mark
	})
	f.checkNotConverged(t, e, "peers blocked")
	if err := e.host.heal(hosts...); err != nil {
		t.Fatal(err)
	}
	healed := time.Now()
	meshtest.Eventually(t, 60*time.Second, "joined once unblocked", func() bool {
		st, err := e.status()
		return err == nil && st.Converged && st.Ready
	})
	f.record("new instance that reaches no peer (wrong key; blocked port, then unblocked)", window{}, time.Now(),
		fmt.Sprintf("not ready, not converged while cut off; joined, converged and ready %s after the unblock", time.Since(healed).Round(10*time.Millisecond)))
	e.kill()
}

func (f *fleet) checkNotConverged(t *testing.T, e *instance, why string) {
	t.Helper()
	var st *admin.Status
	meshtest.Eventually(t, 10*time.Second, "admin API of "+e.name, func() bool {
		var err error
		st, err = e.status()
		return err == nil
	})
	if st.Converged || st.Ready || st.Fleet == nil || st.Fleet.Synced {
		t.Errorf("%s: converged=%v ready=%v (%s) fleet=%s; want neither converged nor ready, not synced", why, st.Converged, st.Ready, st.ReadyReason, jsonString(st.Fleet))
	}
	if v := e.metric("fwdproxy_gossip_converged"); v != 0 {
		t.Errorf("%s: fwdproxy_gossip_converged = %v", why, v)
	}
	out := e.statusText()
	if !strings.Contains(out, "not synced") {
		t.Errorf("%s: fwdproxy status does not say why:\n%s", why, out)
	}
	t.Logf("operator's view of an instance that reaches no peer (%s):\n%s", why, out)
}

// scaleIn takes the leader out as scale-in does: deregistered and drained by the NLB, then the
// lifecycle hook's SIGTERM: it leaves gossip, so leadership moves at once (no failure detection)
// and nothing fails.
func (f *fleet) scaleIn(t *testing.T, l *load, leader *instance, others ...*instance) {
	if st, err := leader.status(); err != nil || !st.Leader {
		t.Fatalf("%s is not the leader: %v", leader.name, err)
	}
	from := time.Now()
	f.deregister(leader.name)
	termAt := time.Now()
	done := make(chan error, 1)
	go func() { done <- leader.terminate() }()
	var leadAfter time.Duration
	next := ""
	meshtest.Eventually(t, 30*time.Second, "leadership moves", func() bool {
		for _, o := range others {
			if st, err := o.status(); err == nil && st.Leader {
				next, leadAfter = o.name, time.Since(termAt)
				return true
			}
		}
		return false
	})
	if err := <-done; err != nil {
		t.Errorf("%s: %v", leader.name, err)
	}
	for _, o := range others {
		if o.cmd == nil {
			continue // not running (an earlier scenario failed before starting it)
		}
		st, err := o.status()
		if err != nil || memberState(st, leader.name) != "left" {
			t.Errorf("%s sees %s as %q, want left (a departure, not a failure): %v", o.name, leader.name, memberState(st, leader.name), err)
		}
	}
	l.waitSent(t, 30)
	w := l.window(from, time.Now())
	f.record("scale-in of the leader (shutdown hooks)", w, from,
		fmt.Sprintf("%s leads %s after SIGTERM (left, not failed)", next, leadAfter.Round(10*time.Millisecond)))
	if w.failed != 0 {
		t.Errorf("scale-in: %d of %d failed; first: %v", w.failed, w.sent, w.firstErr)
	}
}

//go:build linux

package fleet_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
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
	_ = context.Background
}

package dataplane

import (
	"testing"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
)

// Priority levels as Envoy balances them: all to level 0 while it is healthy, spill-over by the
// overprovisioning factor, all to level 1 once level 0's endpoints are ejected, panic (every
// endpoint) when too few are left anywhere.
func TestPickPriority(t *testing.T) {
	dp := New(Options{})
	c := newCluster(dp, &clusterConfig{name: "c", connectTimeout: time.Second, outlier: parseOutlier(&clusterpb.OutlierDetection{})})
	defer c.close()
	c.setEndpoints([]endpointSpec{
		{addr: "10.0.0.1:1", healthy: true}, {addr: "10.0.0.2:1", healthy: true},
		{addr: "10.1.0.1:1", healthy: true, priority: 1},
	})
	hosts := *c.hosts.Load()
	share := func() map[uint32]int {
		got := map[uint32]int{}
		for range 1000 {
			got[c.pick(nil).priority]++
		}
		return got
	}
	if got := share(); got[0] != 1000 {
		t.Errorf("all healthy: %v, want everything on level 0", got)
	}
	// Half of level 0 available: it takes 1.4 x 50% = 70%, level 1 the rest.
	hosts[0].ejected.Store(true)
	if got := share(); got[0] < 600 || got[0] > 800 || got[0]+got[1] != 1000 {
		t.Errorf("level 0 half ejected: %v, want about 700/300", got)
	}
	for range 20 {
		if h := c.pick(nil); h == hosts[0] {
			t.Fatal("an ejected endpoint was picked")
		}
	}
	hosts[1].ejected.Store(true)
	if got := share(); got[1] != 1000 {
		t.Errorf("level 0 ejected: %v, want everything on level 1", got)
	}
	// Nothing available anywhere: panic, every endpoint is a candidate.
	hosts[2].ejected.Store(true)
	seen := map[string]bool{}
	for range 30 {
		seen[c.pick(nil).addr] = true
	}
	if len(seen) != 3 {
		t.Errorf("panic mode picked %v, want all three", seen)
	}
	// Priority is part of the endpoint: a change of level is applied.
	for _, h := range hosts {
		h.ejected.Store(false)
	}
	c.setEndpoints([]endpointSpec{{addr: "10.0.0.1:1", healthy: true, priority: 1}, {addr: "10.1.0.1:1", healthy: true}})
	for range 10 {
		if h := c.pick(nil); h.addr != "10.1.0.1:1" {
			t.Fatalf("after the levels swapped: picked %s", h.addr)
		}
	}
}

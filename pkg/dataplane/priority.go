package dataplane

import "math/rand/v2"

// maxPriority bounds the EDS priority levels a cluster may have (Envoy allows 128 too).
const maxPriority = 127

// overprovisioning is Envoy's default overprovisioning factor (1.4): a priority level whose
// available share of endpoints is h takes min(100%, 1.4*h) of the traffic, and the rest spills
// to the next level.
const overprovisioning = 1.4

// pickPriority is pick for a cluster with several EDS priority levels, as Envoy balances them:
// each level's load is its available (healthy, not ejected) share times the overprovisioning
// factor, capped by what the levels before it left; loads are normalized when the levels
// together cannot take it all; a level is chosen by its load, then an endpoint in it round robin.
// When too few endpoints are available across all levels (normalized health under Envoy's 50%
// panic threshold) every endpoint is a candidate, as in pick.
func (c *cluster) pickPriority(hosts []*host, skip *host) *host {
	var levels [maxPriority + 1]struct{ n, avail int }
	top := 0
	for _, h := range hosts {
		l := &levels[h.priority]
		l.n++
		if h.healthy && !h.ejected.Load() {
			l.avail++
		}
		top = max(top, int(h.priority))
	}
	var load [maxPriority + 1]float64
	left, total := 1.0, 0.0
	for p := 0; p <= top; p++ {
		if levels[p].n == 0 {
			continue
		}
		health := min(1, overprovisioning*float64(levels[p].avail)/float64(levels[p].n))
		total += health
		load[p] = min(left, health)
		left -= load[p]
	}
	if total = min(1, total); total < 0.5 {
		return c.roundRobin(hosts, func(*host) bool { return true }, skip)
	}
	// Normalized: the levels' loads add up to 1.
	r := rand.Float64() * (1 - left)
	level := top
	for p := 0; p <= top; p++ {
		if r < load[p] {
			level = p
			break
		}
		r -= load[p]
	}
	return c.roundRobin(hosts, func(h *host) bool {
		return int(h.priority) == level && h.healthy && !h.ejected.Load()
	}, skip)
}

// roundRobin picks the next candidate after the cluster's round-robin counter, avoiding skip
// if another candidate exists.
func (c *cluster) roundRobin(hosts []*host, candidate func(*host) bool, skip *host) *host {
	n := len(hosts)
	start := int(c.rr.Add(1) % uint64(n))
	var fallback *host
	for i := range n {
		h := hosts[(start+i)%n]
		if !candidate(h) {
			continue
		}
		if h == skip {
			fallback = h
			continue
		}
		return h
	}
	return fallback
}

package controlplane

import (
	"slices"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
)

// byPriority groups a cluster's gateway endpoints by their gateways' priorities, as EDS priority
// levels: Envoy (and the built-in data plane) send everything to the lowest level while enough of
// it is healthy, and fail over to the next as its endpoints are ejected (outlier detection). This
// is how one service in several clusters prefers the local cluster's east-west gateway. Levels
// are numbered 0, 1, ... without gaps (Envoy's rule) whatever numbers the gateways use; with a
// single priority the assignment is one group, as before priorities existed.
func byPriority(eps []*endpoint.LbEndpoint, gateways map[string]Gateway) []*endpoint.LocalityLbEndpoints {
	prio := func(e *endpoint.LbEndpoint) uint32 { return gateways[e.GetEndpoint().GetHostname()].Priority }
	var levels []uint32
	for _, e := range eps {
		levels = append(levels, prio(e))
	}
	slices.Sort(levels)
	levels = slices.Compact(levels)
	if len(levels) <= 1 {
		return []*endpoint.LocalityLbEndpoints{{LbEndpoints: eps}}
	}
	out := make([]*endpoint.LocalityLbEndpoints, len(levels))
	for i := range levels {
		out[i] = &endpoint.LocalityLbEndpoints{Priority: uint32(i)}
	}
	for _, e := range eps {
		i, _ := slices.BinarySearch(levels, prio(e))
		out[i].LbEndpoints = append(out[i].LbEndpoints, e)
	}
	return out
}

package peers

import (
	"context"
	"slices"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
)

// Sources exposes the store to the daemon's pipeline as discovery sources, in priority order:
// the operator entries first (so an operator's entry for a host overrides discovery), then one
// source per configured discovery source, in the configured order. A discovered source reports
// once the leader has reported it, so a joining peer is not ready before it has the fleet's data;
// and no source reports before this peer holds the fleet's full state (Synced): a new instance
// that cannot reach its peers, or has not finished its first exchange, would otherwise serve
// (and pass the load balancer's readiness check with) its own partial view.
func (n *Node) Sources(discovered []string) []discovery.Source {
	out := []discovery.Source{&storeSource{n: n, name: "fleet:operator", prefix: prefixOperator}}
	for _, s := range discovered {
		out = append(out, &storeSource{n: n, name: "fleet:" + s, prefix: discoveredPrefix(s), ready: readyKey(s)})
	}
	return out
}

type storeSource struct {
	n      *Node
	name   string
	prefix string
	ready  string // key that must exist before the first report; "" for none
}

func (s *storeSource) Name() string { return s.name }

// Run reports the source's catalog now (if ready) and after every change to its entries.
func (s *storeSource) Run(ctx context.Context, update func(*catalog.Catalog)) error {
	select {
	case <-ctx.Done():
		return nil
	case <-s.n.Synced():
	}
	var last []Entry
	var lastGen uint64
	reported := false
	for {
		changed := s.n.store.Changed()
		_, isReady := s.n.store.Get(s.ready)
		// Most changes are to other prefixes (an operator entry, while the discovered source
		// holds 10,000): reading and comparing this one is skipped unless its keys changed.
		if gen := s.n.store.Generation(s.prefix); (s.ready == "" || isReady) && (!reported || gen != lastGen) {
			lastGen = gen
			cur := s.n.store.Live(s.prefix)
			if !reported || !slices.EqualFunc(cur, last, func(a, b Entry) bool {
				return a.Key == b.Key && string(a.Value) == string(b.Value)
			}) {
				update(servicesOf(cur))
				last, reported = cur, true
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

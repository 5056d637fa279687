package discovery

import (
	"fmt"
	"slices"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// mergeClusters folds into dst the same host found in another source, as Istio multi-primary
// does: the service in cluster A and in cluster B is one service, reached through both clusters'
// east-west gateways, served by the workloads of either, so its identities are united. That holds
// when both entries name their gateways and share none (each cluster's source names only its own
// gateway); which gateway is preferred is the gateways' priority, applied in translation.
// Otherwise (a file entry that names no gateway, or two entries on one gateway) the earlier entry
// wins and the later is reported. Ports are united by number; a number on which the two disagree
// keeps the earlier entry's protocol and is reported.
func mergeClusters(dst *catalog.Service, s catalog.Service) error {
	if len(dst.Gateways) == 0 || len(s.Gateways) == 0 || sharesGateway(dst.Gateways, s.Gateways) {
		return fmt.Errorf("service %s is defined by more than one source; the first one wins (sources merge only when each names gateways of its own, as clusters of a multi-primary mesh do)", s.Host)
	}
	var err error
	for _, p := range s.Ports {
		i := slices.IndexFunc(dst.Ports, func(q catalog.Port) bool { return q.Number == p.Number })
		switch {
		case i < 0:
			dst.Ports = append(dst.Ports, p)
		case dst.Ports[i].Protocol != p.Protocol && err == nil:
			err = fmt.Errorf("service %s: port %d is %s in one cluster and %s in another; %s is kept (gateways %v)",
				s.Host, p.Number, dst.Ports[i].Protocol, p.Protocol, dst.Ports[i].Protocol, s.Gateways)
		}
	}
	dst.Identities = union(dst.Identities, s.Identities)
	dst.Gateways = union(dst.Gateways, s.Gateways)
	dst.Aliases = union(dst.Aliases, s.Aliases)
	return err
}

func sharesGateway(a, b []string) bool {
	for _, g := range a {
		if slices.Contains(b, g) {
			return true
		}
	}
	return false
}

func union(a, b []string) []string {
	out := slices.Concat(a, b)
	slices.Sort(out)
	return slices.Compact(out)
}

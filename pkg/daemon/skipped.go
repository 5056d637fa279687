package daemon

import (
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// Services that translation leaves out (controlplane/skipped.go) are reported three ways: a log
// line when a service starts being left out or its reason changes (not on every rebuild), the
// fwdproxy_translation_services_skipped gauge by reason, and the skipped list of fwdproxy status.

func newSkippedGauge(reg prometheus.Registerer) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "fwdproxy_translation_services_skipped",
		Help: "Services left out of the served configuration because translation cannot place them, by reason (conflict, invalid, no_gateway_address); every other service is served.",
	}, []string{"reason"})
	for _, r := range controlplane.SkipReasons {
		g.WithLabelValues(r).Set(0) // every reason present, so alerts and dashboards see zeros
	}
	reg.MustRegister(g)
	return g
}

// recordSkipped reports the services the latest translation of cat left out; the others are
// served.
func (d *Daemon) recordSkipped(cat *catalog.Catalog, skipped []controlplane.SkippedService) {
	d.mu.Lock()
	prev := d.skipped
	d.skipped = slices.Clone(skipped)
	d.translated = cat // never modified: a change is a new catalog
	d.mu.Unlock()
	was := map[string]controlplane.SkippedService{}
	for _, s := range prev {
		was[s.Host] = s
	}
	counts := map[string]int{}
	for _, s := range skipped {
		counts[s.Reason]++
		if p, ok := was[s.Host]; !ok || p != s {
			d.log.Warn("service left out of the configuration; every other service is served", "host", s.Host, "reason", s.Reason, "detail", s.Detail)
		}
		delete(was, s.Host)
	}
	for _, s := range prev { // in host order
		if _, ok := was[s.Host]; ok {
			d.log.Info("service no longer left out of the configuration", "host", s.Host, "was", s.Reason)
		}
	}
	for _, r := range controlplane.SkipReasons {
		d.metrics.servicesSkipped.WithLabelValues(r).Set(float64(counts[r]))
	}
}

// servicesStatus is every service's state for the admin API, made when asked for rather than at
// every rebuild (10,000 entries, for a command an operator runs now and then).
func (d *Daemon) servicesStatus() []admin.ServiceState {
	d.mu.Lock()
	cat, skipped := d.translated, d.skipped
	d.mu.Unlock()
	if cat == nil {
		return nil
	}
	left := map[string]controlplane.SkippedService{}
	for _, s := range skipped {
		left[s.Host] = s
	}
	states := make([]admin.ServiceState, 0, len(cat.Services))
	for _, sv := range cat.Services {
		st := admin.ServiceState{Host: sv.Host, State: admin.StateServed}
		for _, p := range sv.Ports {
			st.Ports = append(st.Ports, p.Number)
		}
		if s, ok := left[sv.Host]; ok {
			st.State, st.Reason, st.Detail = admin.StateSkipped, s.Reason, s.Detail
		}
		states = append(states, st)
	}
	slices.SortFunc(states, func(a, b admin.ServiceState) int { return strings.Compare(a.Host, b.Host) })
	return states
}

// skippedStatus is the skipped list for the admin API.
func (d *Daemon) skippedStatus() []admin.SkippedService {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []admin.SkippedService
	for _, s := range d.skipped {
		out = append(out, admin.SkippedService{Host: s.Host, Reason: s.Reason, Detail: s.Detail})
	}
	return out
}

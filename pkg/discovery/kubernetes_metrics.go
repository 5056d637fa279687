package discovery

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// SourceMetrics are the discovery sources' health metrics, labelled by source name. A nil
// *SourceMetrics records nothing.
type SourceMetrics struct {
	syncErrors  *prometheus.CounterVec
	lastSuccess *prometheus.GaugeVec
	skipped     *prometheus.GaugeVec
	connected   *prometheus.GaugeVec
	since       *prometheus.GaugeVec
}

// NewSourceMetrics registers the discovery metrics with reg.
func NewSourceMetrics(reg prometheus.Registerer) *SourceMetrics {
	m := &SourceMetrics{
		syncErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fwdproxy_discovery_sync_errors_total",
			Help: "Failed attempts of a discovery source to read its inputs (e.g. Kubernetes list/watch errors).",
		}, []string{"source"}),
		lastSuccess: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fwdproxy_discovery_last_success_timestamp_seconds",
			Help: "When a discovery source last built its catalog from up-to-date inputs.",
		}, []string{"source"}),
		skipped: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fwdproxy_discovery_services_skipped",
			Help: "Services a discovery source currently leaves out of its catalog, by reason (no_workload_identity, no_tcp_ports, invalid).",
		}, []string{"source", "reason"}),
		connected: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fwdproxy_discovery_connected",
			Help: "1 when every list/watch of a Kubernetes discovery source is connected to its API server, 0 while any is failing.",
		}, []string{"source"}),
		since: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fwdproxy_discovery_connected_since_timestamp_seconds",
			Help: "When fwdproxy_discovery_connected last changed: since when a source has been connected, or disconnected.",
		}, []string{"source"}),
	}
	reg.MustRegister(m.syncErrors, m.lastSuccess, m.skipped, m.connected, m.since)
	return m
}

// SyncError counts a failed read of a source's inputs.
func (m *SourceMetrics) syncError(source string) {
	if m != nil {
		m.syncErrors.WithLabelValues(source).Inc()
	}
}

func (m *SourceMetrics) success(source string, now time.Time) {
	if m != nil {
		m.syncErrors.WithLabelValues(source) // export 0 before the first error
		m.lastSuccess.WithLabelValues(source).Set(float64(now.UnixNano()) / 1e9)
	}
}

func (m *SourceMetrics) setSkipped(source string, skipped map[string]string) {
	if m == nil {
		return
	}
	counts := map[string]int{SkipNoIdentity: 0, SkipNoPorts: 0, SkipInvalid: 0}
	for _, reason := range skipped {
		counts[reason]++
	}
	for reason, n := range counts {
		m.skipped.WithLabelValues(source, reason).Set(float64(n))
	}
}

func (m *SourceMetrics) setConnected(source string, up bool, since time.Time) {
	if m == nil {
		return
	}
	m.syncErrors.WithLabelValues(source) // export 0 before the first error
	v := 0.0
	if up {
		v = 1
	}
	m.connected.WithLabelValues(source).Set(v)
	m.since.WithLabelValues(source).Set(float64(since.UnixNano()) / 1e9)
}

package dataplane

import "github.com/prometheus/client_golang/prometheus"

// Upstream error reasons, the values of the reason label.
const (
	reasonConnect   = "connect"
	reasonTLS       = "tls"
	reasonTimeout   = "timeout"
	reasonReset     = "reset"
	reasonNoHealthy = "no_healthy_upstream"
)

type metrics struct {
	connActive   *prometheus.GaugeVec
	connTotal    *prometheus.CounterVec
	connRefused  *prometheus.CounterVec
	requests     *prometheus.CounterVec
	upstreamErrs *prometheus.CounterVec
	// downstreamErrs are requests and connections that failed because of their client.
	downstreamErrs *prometheus.CounterVec
	tlsFailures    *prometheus.CounterVec
	rbacDenied     *prometheus.CounterVec
	// reverseRequests and reverseConns are the reverse direction's calls per VM service and
	// caller principal ("other" for a principal the service does not allow).
	reverseRequests *prometheus.CounterVec
	reverseConns    *prometheus.CounterVec
	ejections       *prometheus.CounterVec
	xdsConnected    prometheus.Gauge
	xdsRejections   *prometheus.CounterVec
	// xdsReceiveErrors counts responses that could not even be received (too_large): unlike a
	// rejection, there is nothing to NACK, as the stream ends before the response is read.
	xdsReceiveErrors *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		connActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "fwdproxy_dataplane_connections_active",
			Help: "Downstream connections open on a listener."}, []string{"listener"}),
		connTotal: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_connections_total",
			Help: "Downstream connections accepted on a listener."}, []string{"listener"}),
		connRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_connections_refused_total",
			Help: "Downstream connections closed at once: limit (the listener's max_connections), overload (the data plane's cap on all connections)."}, []string{"listener", "reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_requests_total",
			Help: "HTTP requests routed to a cluster, by response code."}, []string{"cluster", "code"}),
		upstreamErrs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_upstream_errors_total",
			Help: "Failures toward a cluster's endpoints: connect, tls, timeout, reset, no_healthy_upstream."}, []string{"cluster", "reason"}),
		downstreamErrs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_downstream_errors_total",
			Help: "Requests and connections that failed because of their client, never counted against a gateway: bad_request, client_closed, headers_too_large, too_many_headers, client_stalled."}, []string{"listener", "reason"}),
		tlsFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_tls_handshake_failures_total",
			Help: "TLS handshakes with a cluster's endpoints that failed, including certificate verification."}, []string{"cluster"}),
		reverseRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_reverse_requests_total",
			Help: "HTTP requests from the mesh to a VM service, by service (HOST:PORT), caller principal and response code."}, []string{"service", "principal", "code"}),
		reverseConns: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_reverse_connections_total",
			Help: "TCP connections from the mesh to a VM service, by service (HOST:PORT), caller principal and result (allowed, denied)."}, []string{"service", "principal", "result"}),
		rbacDenied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_rbac_denied_total",
			Help: "Connections or requests denied by RBAC, by listener."}, []string{"listener"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_ejections_total",
			Help: "Endpoints ejected by outlier detection."}, []string{"cluster"}),
		xdsConnected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "fwdproxy_dataplane_xds_connected",
			Help: "1 while the data plane has an open ADS stream to the control plane."}),
		xdsRejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_xds_rejected_total",
			Help: "Configuration versions the data plane rejected (NACKed), by resource type."}, []string{"type"}),
		xdsReceiveErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_dataplane_xds_receive_errors_total",
			Help: "Responses from the control plane the data plane could not receive (too_large: over its message limit); it keeps its last good configuration."}, []string{"reason"}),
	}
	m.xdsReceiveErrors.WithLabelValues("too_large")
	if reg != nil {
		reg.MustRegister(m.connActive, m.connTotal, m.connRefused, m.requests, m.upstreamErrs, m.downstreamErrs, m.tlsFailures, m.rbacDenied, m.reverseRequests, m.reverseConns, m.ejections,
			m.xdsConnected, m.xdsRejections, m.xdsReceiveErrors)
	}
	return m
}

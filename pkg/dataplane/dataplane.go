// Package dataplane is fwdproxy's built-in data plane: a small Envoy stand-in that takes its
// whole configuration from the control plane over one delta ADS stream (xDS v3; a change costs
// the resources it changed, xds.go and parsecache.go) and moves the bytes, so a host without Envoy
// (a laptop, a Windows VM, a test) can reach the mesh with one static binary.
//
// It serves exactly the subset of xDS that pkg/controlplane emits (TestGoldenAccepted parses
// every translation golden case; TestRefusesWhatNothingEmits pins refusals of what none emits):
//
//   - LDS: plain listeners with one filter chain (clients admitted by source_prefix_ranges): the
//     connection_limit filter, then tcp_proxy to a cluster, or an HTTP connection manager
//     (codec AUTO: HTTP/1.1 and HTTP/2 with prior knowledge; RDS or inline routes, an optional
//     HTTP RBAC filter with per-virtual-host RBACPerRoute rules, the router filter, stdout access
//     logs) with Envoy's request header handling: use_remote_address, internal_address_config,
//     forward_client_cert_details, request IDs, the x-envoy-* headers a client may not set
//     (headers.go); and the reverse direction's inbound listener (inbound.go), the only one with
//     network RBAC.
//   - RDS: virtual hosts matched by Host the way Envoy does (exact, then suffix and prefix
//     wildcards, then "*"), case-sensitive prefix routes to a cluster, route timeouts,
//     internal_only_headers.
//   - CDS/EDS: EDS, STATIC or STRICT_DNS clusters, round robin, connect timeout, outlier detection
//     (required: consecutive 5xx / gateway failures, ejection for base_ejection_time x
//     ejections, max_ejection_percent, interval), upstream HTTP/1.1 or HTTP/2 named by
//     HttpProtocolOptions' explicit_http_config.
//   - TLS origination from UpstreamTlsContext: SNI, ALPN, the client chain and key from an SDS
//     secret, server chain verification against an SDS trust bundle (combined_validation_context)
//     and SAN matching (match_typed_subject_alt_names: exact or prefix), failing closed; no
//     inline certificates or trust bundles. Secrets apply to new connections at once; TLS
//     sessions resume (max_session_keys) until the certificate or trust bundle rotates.
//
// Anything else in a response is rejected (NACK) with a message naming the resource and the
// field, and the last accepted configuration keeps serving. Updates swap atomically: a
// listener whose address is unchanged keeps its socket, open connections finish with the
// configuration they started with, removed listeners stop accepting and drain for a bounded
// time. While the control plane is unreachable the data plane keeps serving and reconnects with
// backoff.
//
// Use:
//
//	dp := dataplane.New(dataplane.Options{ServerAddress: "/run/fwdproxy/xds.sock", NodeID: "a", Log: log})
//	go dp.Run(ctx) // returns when ctx ends, after draining
//	dp.Ready()     // true once listeners, clusters and everything they reference are applied
package dataplane

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http/httputil"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fwdproxy/fwdproxy/internal/ratelog"
	"github.com/fwdproxy/fwdproxy/internal/xdslimit"
)

// Options configure a data plane.
type Options struct {
	// ServerAddress is the control plane's ADS address: a Unix socket (an absolute path or
	// unix:PATH; the daemon's xds.socket), or host:port for TCP, which then needs TLS.
	ServerAddress string
	// TLS is the client configuration for a TCP control plane (its CA, this data plane's
	// certificate). Without it a TCP connection is plain text, for tests only.
	TLS *tls.Config
	// Dialer, when set, makes the connection to the control plane instead (the daemon's
	// in-process listener); ServerAddress then only names it in logs.
	Dialer func(ctx context.Context, addr string) (net.Conn, error)
	// NodeID and NodeCluster identify this data plane to the control plane.
	NodeID, NodeCluster string
	// Log receives operational logs; nil discards them.
	Log *slog.Logger
	// Registerer receives the fwdproxy_dataplane_* metrics; nil registers none.
	Registerer prometheus.Registerer
	// ListenAddress, when set, replaces the IP address of every listener (e.g. 127.0.0.1 in
	// tests of a config that listens on 0.0.0.0). The port is kept.
	ListenAddress string
	// DrainTime bounds how long removed listeners (and all listeners at shutdown) wait for open
	// connections before closing them; default 10s.
	DrainTime time.Duration
	// AccessLog is where a stdout access logger writes; default os.Stdout.
	AccessLog io.Writer
	// MaxBackoff caps the wait between reconnection attempts; default 10s.
	MaxBackoff time.Duration
	// MaxMessageBytes is the largest xDS message received or sent; default
	// xdslimit.MaxMessageBytes, the most the control plane ever sends.
	MaxMessageBytes int
	// MaxConnections caps the downstream connections of all listeners together (Envoy's
	// overload manager's global_downstream_max_connections); past it a new connection is closed
	// at once. 0 derives it from the process's file descriptor limit: half of what is left
	// after the listeners and a reserve for the daemon (its metrics and /ready, xDS, gossip),
	// since each connection also needs one upstream. Negative: no cap.
	MaxConnections int
}

// fdReserve is what the connection cap leaves of the file descriptor limit for everything but
// proxied connections.
const fdReserve = 256

// DataPlane is one running data plane. Create it with New and start it with Run.
type DataPlane struct {
	opts    Options
	log     *slog.Logger
	metrics *metrics
	proxy   *httputil.ReverseProxy

	logStdout *accessLogger

	// What requests read, swapped whole on every update.
	clusters atomic.Pointer[map[string]*cluster]
	routes   atomic.Pointer[map[string]*routeTable]
	secrets  atomic.Pointer[map[string]*secret]

	// Owned by the xDS goroutine.
	endpoints map[string][]endpointSpec // by EDS name
	subs      map[string]*subscription  // by type URL
	listeners map[string]*listenerRT    // by bind address
	// parsedListeners and parsedClusters keep what was parsed, by resource name (parsecache.go).
	parsedListeners parseCache[*listenerConfig]
	parsedClusters  parseCache[*clusterConfig]
	draining        sync.WaitGroup

	logLimit      ratelog.Limiter // repeated warnings (accept failures on every listener)
	fileLimit     int             // RLIMIT_NOFILE at start, 0 if unknown
	downstream    atomic.Int64    // downstream connections open, all listeners
	listenerCount atomic.Int64

	mu        sync.Mutex // guards the status fields below and listeners for readers
	connected bool
	lastNACK  string
	ready     bool
	serving   bool // ready once: listeners keep serving whatever happens to the stream
}

// New makes a data plane; nothing runs until Run.
func New(o Options) *DataPlane {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.DrainTime <= 0 {
		o.DrainTime = 10 * time.Second
	}
	if o.AccessLog == nil {
		o.AccessLog = os.Stdout
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 10 * time.Second
	}
	if o.MaxMessageBytes <= 0 {
		o.MaxMessageBytes = xdslimit.MaxMessageBytes
	}
	dp := &DataPlane{
		opts:      o,
		log:       o.Log,
		metrics:   newMetrics(o.Registerer),
		logStdout: &accessLogger{w: o.AccessLog},
		endpoints: map[string][]endpointSpec{},
		listeners: map[string]*listenerRT{},
		fileLimit: fileLimit(),
	}
	dp.proxy = dp.newReverseProxy()
	dp.clusters.Store(&map[string]*cluster{})
	dp.routes.Store(&map[string]*routeTable{})
	dp.secrets.Store(&map[string]*secret{})
	dp.subs = newSubscriptions()
	return dp
}

// connectionCap is the most downstream connections all listeners may hold, or 0 for no cap.
func (dp *DataPlane) connectionCap() int {
	switch {
	case dp.opts.MaxConnections > 0:
		return dp.opts.MaxConnections
	case dp.opts.MaxConnections < 0 || dp.fileLimit <= 0:
		return 0
	}
	return max((dp.fileLimit-fdReserve-int(dp.listenerCount.Load()))/2, 1)
}

func (dp *DataPlane) cluster(name string) *cluster       { return (*dp.clusters.Load())[name] }
func (dp *DataPlane) routeTable(name string) *routeTable { return (*dp.routes.Load())[name] }
func (dp *DataPlane) secret(name string) *secret         { return (*dp.secrets.Load())[name] }

// Ready reports whether the data plane has applied listeners and clusters and everything they
// reference (routes, endpoints, secrets).
func (dp *DataPlane) Ready() bool {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	return dp.ready
}

// Status is a snapshot of the data plane's state, for operators and tests.
type Status struct {
	// Connected is true while the ADS stream is open.
	Connected bool
	// Ready is true while everything the accepted listeners and clusters reference is applied.
	Ready bool
	// Serving is true once the data plane was ready: from then on its listeners serve the last
	// configuration it accepted, whether or not newer ones arrive (a rejected or unreceivable
	// response, a lost control plane, a new listener still waiting for its routes).
	Serving bool
	// Versions are the last accepted versions by resource type: listener, route, cluster,
	// endpoint, secret.
	Versions map[string]string
	// LastRejection is the error of the last NACK, empty if none.
	LastRejection string
	// Listeners maps listener names to the addresses they are bound to.
	Listeners map[string]string
	// Clusters maps cluster names to their endpoints ("ip:port" list, "(ejected)" marked).
	Clusters map[string]string
}

// Status reports the current state.
func (dp *DataPlane) Status() Status {
	dp.mu.Lock()
	st := Status{Connected: dp.connected, Ready: dp.ready, Serving: dp.serving, LastRejection: dp.lastNACK, Versions: map[string]string{}, Listeners: map[string]string{}, Clusters: map[string]string{}}
	for _, s := range dp.subs {
		st.Versions[typeName(s.typeURL)] = s.version
	}
	for _, l := range dp.listeners {
		st.Listeners[l.cfg.Load().name] = l.ln.Addr().String()
	}
	dp.mu.Unlock()
	for name, c := range *dp.clusters.Load() {
		st.Clusters[name] = c.hostsString()
	}
	return st
}

// ListenerAddr is the address a listener is bound to (useful when its port is 0), or "".
func (dp *DataPlane) ListenerAddr(name string) string {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	for _, l := range dp.listeners {
		if l.cfg.Load().name == name {
			return l.ln.Addr().String()
		}
	}
	return ""
}

// Run connects to the control plane and serves until ctx ends, then drains every listener
// (bounded by DrainTime) and returns nil. Control-plane failures are retried with backoff while
// the last configuration keeps serving.
func (dp *DataPlane) Run(ctx context.Context) error {
	defer dp.shutdown()
	go dp.outlierSweeps(ctx)
	return dp.runXDS(ctx)
}

// outlierSweeps runs each cluster's outlier sweep on its interval, from one goroutine for all
// clusters (a fleet config may hold tens of thousands).
func (dp *DataPlane) outlierSweeps(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			for _, c := range *dp.clusters.Load() {
				c.sweepDue(now)
			}
		}
	}
}

func (dp *DataPlane) shutdown() {
	dp.mu.Lock()
	ls := slices.Collect(maps.Values(dp.listeners))
	dp.listeners = map[string]*listenerRT{}
	dp.mu.Unlock()
	var wg sync.WaitGroup
	for _, l := range ls {
		wg.Go(func() { l.drain(dp.opts.DrainTime) })
	}
	wg.Wait()
	dp.draining.Wait()
	for _, c := range *dp.clusters.Load() {
		c.close()
	}
}

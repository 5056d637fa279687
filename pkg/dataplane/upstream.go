package dataplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
)

// cluster is a live upstream cluster: its current config (swapped atomically on CDS updates),
// its endpoints (swapped on EDS updates, keeping each endpoint's outlier state), round robin
// and outlier detection. It survives config changes under the same name, so pooled
// connections and ejections persist.
type cluster struct {
	name string
	dp   *DataPlane
	rt   atomic.Pointer[clusterRuntime]
	// hosts is the current endpoint list; never nil after creation.
	hosts atomic.Pointer[[]*host]
	rr    atomic.Uint64

	mu        sync.Mutex   // outlier state of the hosts
	lastSweep atomic.Int64 // unix nanoseconds of the last outlier sweep
	stopped   sync.Once
	done      chan struct{} // closed when the cluster is removed
	active    atomic.Bool   // activeLoop runs

	// codes caches this cluster's children of the requests counter by status code, so a
	// request does not format and hash its labels.
	codes sync.Map // int -> prometheus.Counter
}

// requestCounter is the requests counter of this cluster for a response code.
func (c *cluster) requestCounter(code int) prometheus.Counter {
	if v, ok := c.codes.Load(code); ok {
		return v.(prometheus.Counter)
	}
	ctr := c.dp.metrics.requests.WithLabelValues(c.name, strconv.Itoa(code))
	c.codes.Store(code, ctr)
	return ctr
}

// clusterRuntime is one version of a cluster's config with the transports built from it.
type clusterRuntime struct {
	cfg *clusterConfig
	tls *tls.Config // nil: plain TCP
	// sessions hands each handshake its generation's session cache (tlsresume.go); nil when
	// max_session_keys is 0.
	sessions *sessionCaches
	h1       *http.Transport
	//lint:ignore SA1019 x/net/http2's Transport speaks HTTP/2 with prior knowledge over the connection dialAddr hands it, whatever ALPN settled, as Envoy does for an HTTP/2 cluster; net/http's own HTTP/2 needs ALPN h2 on TLS
	h2   *http2.Transport
	http http.RoundTripper
	pool *h1Pool // HTTP/1.1 fast path connections (see h1.go); nil for HTTP/2 clusters
}

type host struct {
	addr, hostname string
	healthy        bool   // as reported by EDS
	priority       uint32 // EDS priority level
	ejected        atomic.Bool
	// hcFailed: the cluster's active health check (health.go) marks the host down.
	hcFailed atomic.Bool
	// consecutive active health check results; health.go's loop only
	hcFails, hcPasses uint32

	// consecutive failures; written under cluster.mu, read without it on the fast path
	consec5xx, consecGateway atomic.Uint32
	// guarded by cluster.mu
	ejectedAt time.Time
	ejections uint32
}

// up reports whether the host takes traffic: healthy by EDS, passing its active health check,
// not ejected.
func (h *host) up() bool { return h.healthy && !h.hcFailed.Load() && !h.ejected.Load() }

func newCluster(dp *DataPlane, cfg *clusterConfig) *cluster {
	c := &cluster{name: cfg.name, dp: dp, done: make(chan struct{})}
	c.hosts.Store(&[]*host{})
	c.lastSweep.Store(time.Now().UnixNano())
	c.setConfig(cfg)
	return c
}

// setConfig swaps in a new config; connections already open keep working, idle ones of the
// old config are closed.
func (c *cluster) setConfig(cfg *clusterConfig) {
	rt := &clusterRuntime{cfg: cfg}
	if cfg.tls != nil {
		spec := cfg.tls
		rt.tls = &tls.Config{
			ServerName: spec.sni,
			NextProtos: spec.alpn,
			MinVersion: spec.minVersion,
			MaxVersion: spec.maxVersion,
			// The chain and SANs are verified in VerifyConnection against the trust bundle of
			// the moment (SDS may rotate it) and the cluster's SAN matchers; Go's own check
			// would need a DNS name, which mesh certificates do not carry.
			InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection, fail closed
			VerifyConnection:   func(cs tls.ConnectionState) error { return c.dp.verifyServer(spec, cs) },
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				return c.dp.clientCertificate(spec)
			},
		}
		if spec.sessionKeys > 0 {
			// As Envoy (max_session_keys): a new connection resumes the last session instead of
			// a full handshake. VerifyConnection still checks the resumed chain against the trust
			// bundle and SANs of the moment.
			rt.sessions = newSessionCaches(c.dp, spec)
		}
	}
	if cfg.http2 {
		rt.h2 = newH2Transport(rt.tls == nil, func(ctx context.Context, addr string) (net.Conn, error) {
			return c.dialAddr(ctx, rt, addr)
		})
		rt.http = rt.h2
	} else {
		rt.h1 = &http.Transport{
			Proxy:               nil,
			DisableCompression:  true,
			ForceAttemptHTTP2:   false,
			TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
			MaxIdleConns:        0,
			MaxIdleConnsPerHost: 1024,
			IdleConnTimeout:     5 * time.Minute,
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return c.dialAddr(ctx, rt, addr)
			},
			DialTLSContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return c.dialAddr(ctx, rt, addr)
			},
		}
		rt.http = rt.h1
		rt.pool = &h1Pool{}
	}
	old := c.rt.Swap(rt)
	if old != nil {
		old.closeIdle()
	}
	if (cfg.health != nil || len(cfg.dns) > 0) && !c.active.Swap(true) {
		go c.activeLoop() // health.go: active health checks and DNS resolution
	}
}

func (rt *clusterRuntime) closeIdle() {
	if rt.h1 != nil {
		rt.h1.CloseIdleConnections()
	}
	if rt.h2 != nil {
		//lint:ignore SA1019 see clusterRuntime.h2
		rt.h2.CloseIdleConnections()
	}
	if rt.pool != nil {
		rt.pool.closeIdle()
	}
}

func (rt *clusterRuntime) scheme() string {
	if rt.tls != nil {
		return "https"
	}
	return "http"
}

// close closes idle connections; open ones finish on their own.
func (c *cluster) close() {
	c.stopped.Do(func() {
		close(c.done)
		c.rt.Load().closeIdle()
	})
}

// setEndpoints replaces the endpoint list, keeping the outlier state of endpoints that stay.
func (c *cluster) setEndpoints(eps []endpointSpec) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := map[string]*host{}
	for _, h := range *c.hosts.Load() {
		old[h.addr] = h
	}
	list := make([]*host, 0, len(eps))
	for _, e := range eps {
		h := old[e.addr]
		if h == nil || h.healthy != e.healthy || h.hostname != e.hostname || h.priority != e.priority {
			nh := &host{addr: e.addr, hostname: e.hostname, healthy: e.healthy, priority: e.priority}
			if h != nil {
				nh.consec5xx.Store(h.consec5xx.Load())
				nh.consecGateway.Store(h.consecGateway.Load())
				nh.ejectedAt, nh.ejections = h.ejectedAt, h.ejections
				nh.ejected.Store(h.ejected.Load())
				nh.hcFailed.Store(h.hcFailed.Load())
				nh.hcFails, nh.hcPasses = h.hcFails, h.hcPasses
			}
			h = nh
		}
		list = append(list, h)
	}
	c.hosts.Store(&list)
}

// pick chooses an endpoint round robin among the healthy, non-ejected ones, avoiding skip if
// another is available. Below 50% available endpoints it uses all of them (Envoy's panic
// threshold), so ejection never turns a degraded cluster into an empty one.
func (c *cluster) pick(skip *host) *host {
	hosts := *c.hosts.Load()
	n := len(hosts)
	if n == 0 {
		return nil
	}
	avail, prioritized := 0, false
	for _, h := range hosts {
		if h.up() {
			avail++
		}
		prioritized = prioritized || h.priority != 0
	}
	if prioritized {
		return c.pickPriority(hosts, skip)
	}
	panicMode := avail*2 < n
	start := int(c.rr.Add(1) % uint64(n))
	var fallback *host
	for i := range n {
		h := hosts[(start+i)%n]
		if !panicMode && !h.up() {
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

func (c *cluster) hostByAddr(addr string) *host {
	for _, h := range *c.hosts.Load() {
		if h.addr == addr {
			return h
		}
	}
	return nil
}

// upstreamError is a failure toward an endpoint, with its metric reason.
type upstreamError struct {
	reason  string
	cluster string
	addr    string
	err     error
}

func (e *upstreamError) Error() string {
	switch e.reason {
	case reasonNoHealthy:
		return "no healthy upstream in cluster " + e.cluster
	case reasonTLS:
		return fmt.Sprintf("TLS handshake with %s (cluster %s) failed: %v", e.addr, e.cluster, e.err)
	case reasonTimeout:
		return fmt.Sprintf("connect to %s (cluster %s) timed out: %v", e.addr, e.cluster, e.err)
	}
	return fmt.Sprintf("%s error toward %s (cluster %s): %v", e.reason, e.addr, e.cluster, e.err)
}

func (e *upstreamError) Unwrap() error { return e.err }

// connectFailure reports whether nothing was sent, so another endpoint may be tried.
func (e *upstreamError) connectFailure() bool {
	return e.reason == reasonConnect || e.reason == reasonTLS || (e.reason == reasonTimeout && e.addr != "")
}

// dialAddr connects to an endpoint with the runtime's connect timeout and TLS, recording
// failures in metrics and outlier detection.
func (c *cluster) dialAddr(ctx context.Context, rt *clusterRuntime, addr string) (net.Conn, error) {
	h := c.hostByAddr(addr)
	ctx, cancel := context.WithTimeout(ctx, rt.cfg.connectTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		reason := reasonConnect
		if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			reason = reasonTimeout
		}
		if errors.Is(err, context.Canceled) {
			return nil, err
		}
		c.failed(h, reason)
		return nil, &upstreamError{reason: reason, cluster: c.name, addr: addr, err: err}
	}
	if rt.tls == nil {
		return raw, nil
	}
	tc := tls.Client(raw, rt.handshakeConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		if errors.Is(ctx.Err(), context.Canceled) {
			return nil, err
		}
		reason := reasonTLS
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			reason = reasonTimeout
		} else {
			c.dp.metrics.tlsFailures.WithLabelValues(c.name).Inc()
		}
		c.failed(h, reason)
		return nil, &upstreamError{reason: reason, cluster: c.name, addr: addr, err: err}
	}
	return tc, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// failed counts a locally originated failure (connect, TLS, reset): Envoy maps those to a 503
// for outlier detection unless told to split them.
func (c *cluster) failed(h *host, reason string) {
	c.dp.metrics.upstreamErrs.WithLabelValues(c.name, reason).Inc()
	if h != nil {
		c.outcome(h, 503)
	}
}

// outcome feeds outlier detection with an upstream status code (503 for local failures).
func (c *cluster) outcome(h *host, code int) {
	od := c.rt.Load().cfg.outlier
	if h == nil {
		return
	}
	if code < 500 {
		if h.consec5xx.Load() == 0 && h.consecGateway.Load() == 0 {
			return // the common case takes no lock
		}
		c.mu.Lock()
		h.consec5xx.Store(0)
		h.consecGateway.Store(0)
		c.mu.Unlock()
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n5xx := h.consec5xx.Add(1)
	gateway := code == 502 || code == 503 || code == 504
	var nGateway uint32
	if gateway {
		nGateway = h.consecGateway.Add(1)
	}
	switch {
	case od.consec5xx > 0 && n5xx >= od.consec5xx && enforce(od.enforce5xx):
		c.eject(h, od, "consecutive 5xx")
	case gateway && od.consecGateway > 0 && nGateway >= od.consecGateway && enforce(od.enforceGateway):
		c.eject(h, od, "consecutive gateway failures")
	}
}

func enforce(pct uint32) bool {
	return pct >= 100 || (pct > 0 && rand.Uint32N(100) < pct)
}

// eject takes h out of rotation for base_ejection_time x its number of ejections, unless that
// would eject more than max_ejection_percent of the cluster (at least one host may always be
// ejected, as in Envoy). Callers hold c.mu.
func (c *cluster) eject(h *host, od *outlierSpec, why string) {
	if h.ejected.Load() {
		return
	}
	hosts := *c.hosts.Load()
	ejected := 0
	for _, x := range hosts {
		if x.ejected.Load() {
			ejected++
		}
	}
	if ejected > 0 && float64(ejected+1)*100/float64(len(hosts)) > float64(od.maxEjectionPercent) {
		return
	}
	h.consec5xx.Store(0)
	h.consecGateway.Store(0)
	h.ejections++
	h.ejectedAt = time.Now()
	h.ejected.Store(true)
	c.dp.metrics.ejections.WithLabelValues(c.name).Inc()
	c.dp.log.Warn("endpoint ejected", "cluster", c.name, "endpoint", h.addr, "gateway", h.hostname,
		"reason", why, "for", ejectionTime(h, od).String())
}

func ejectionTime(h *host, od *outlierSpec) time.Duration {
	return min(od.baseEjection*time.Duration(h.ejections), od.maxEje)
}

// sweepDue runs the cluster's outlier sweep when its interval has passed since the last one.
func (c *cluster) sweepDue(now time.Time) {
	interval := c.rt.Load().cfg.outlier.interval
	last := c.lastSweep.Load()
	if now.UnixNano()-last < int64(interval) {
		return
	}
	c.lastSweep.Store(now.UnixNano())
	c.sweep(now)
	if p := c.rt.Load().pool; p != nil {
		p.prune(now)
	}
}

// sweep returns ejected endpoints to rotation when their time is up, and lowers the ejection
// multiplier of endpoints that stayed in rotation for an interval.
func (c *cluster) sweep(now time.Time) {
	od := c.rt.Load().cfg.outlier
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, h := range *c.hosts.Load() {
		switch {
		case h.ejected.Load() && !now.Before(h.ejectedAt.Add(ejectionTime(h, od))):
			h.ejected.Store(false)
			c.dp.log.Info("endpoint returned to rotation", "cluster", c.name, "endpoint", h.addr)
		case !h.ejected.Load() && h.ejections > 0:
			h.ejections--
		}
	}
}

// connect picks an endpoint and connects to it, trying other endpoints when the connection
// itself fails (nothing was sent yet), up to attempts in all (tcp_proxy's max_connect_attempts).
func (c *cluster) connect(ctx context.Context, attempts int) (net.Conn, *host, error) {
	rt := c.rt.Load()
	var tried *host
	var lastErr error
	for attempt := 0; attempt < max(attempts, 1); attempt++ {
		h := c.pick(tried)
		if h == nil || (attempt > 0 && h == tried) {
			break
		}
		conn, err := c.dialAddr(ctx, rt, h.addr)
		if err == nil {
			return conn, h, nil
		}
		lastErr = err
		var ue *upstreamError
		if !errors.As(err, &ue) || !ue.connectFailure() {
			return nil, h, err
		}
		tried = h
	}
	if lastErr == nil {
		c.dp.metrics.upstreamErrs.WithLabelValues(c.name, reasonNoHealthy).Inc()
		lastErr = &upstreamError{reason: reasonNoHealthy, cluster: c.name}
	}
	return nil, tried, lastErr
}

// RoundTrip sends an HTTP request to one of the cluster's endpoints. A request without a body
// whose connection fails is tried on another endpoint (nothing reached the service), as often as
// the route's retry policy allows.
func (c *cluster) RoundTrip(req *http.Request) (*http.Response, error) {
	rt := c.rt.Load()
	req.URL.Scheme = rt.scheme()
	retries := 0
	info, _ := req.Context().Value(proxyKey{}).(*proxyInfo)
	if info != nil {
		retries = info.retries
	}
	var tried *host
	var lastErr error
	for attempt := 0; ; attempt++ {
		h := c.pick(tried)
		if h == nil || (attempt > 0 && h == tried) {
			if lastErr != nil {
				return nil, lastErr // no other endpoint to try
			}
			c.dp.metrics.upstreamErrs.WithLabelValues(c.name, reasonNoHealthy).Inc()
			return nil, &upstreamError{reason: reasonNoHealthy, cluster: c.name}
		}
		req.URL.Host = h.addr
		if info != nil {
			info.upstream = h.addr
		}
		var resp *http.Response
		var err error
		if rt.pool != nil && !h1Disabled.Load() && h1FastPath(req) {
			addr := h.addr
			resp, err = rt.roundTripH1(req, addr, func() (net.Conn, error) { return c.dialAddr(req.Context(), rt, addr) })
		} else {
			resp, err = rt.http.RoundTrip(req)
		}
		if err == nil {
			c.outcome(h, resp.StatusCode)
			return resp, nil
		}
		if info != nil {
			if berr := info.body.failure(); berr != nil {
				// The request body could not be read from the client: nothing says anything of
				// the gateway, so neither metrics nor outlier detection hear of it.
				return nil, &downstreamError{err: berr}
			}
		}
		var ue *upstreamError
		if errors.As(err, &ue) {
			if attempt < retries && ue.connectFailure() && (req.Body == nil || req.Body == http.NoBody) {
				tried, lastErr = h, err
				continue
			}
			return nil, err
		}
		if req.Context().Err() != nil {
			if errors.Is(context.Cause(req.Context()), errRouteTimeout) {
				c.failed(h, reasonTimeout)
				return nil, &upstreamError{reason: reasonTimeout, cluster: c.name, err: errRouteTimeout}
			}
			return nil, err // the client went away
		}
		c.failed(h, reasonReset)
		if info != nil && info.resetRetry && attempt < retries && (req.Body == nil || req.Body == http.NoBody) {
			tried, lastErr = h, &upstreamError{reason: reasonReset, cluster: c.name, addr: h.addr, err: err}
			continue
		}
		return nil, &upstreamError{reason: reasonReset, cluster: c.name, addr: h.addr, err: err}
	}
}

var errRouteTimeout = errors.New("upstream request timeout")

// verifyServer checks the server's chain against the trust bundle of the moment and its SANs
// against the cluster's matchers. Anything missing fails the handshake.
func (dp *DataPlane) verifyServer(spec *tlsSpec, cs tls.ConnectionState) error {
	s := dp.secret(spec.rootsSecret)
	if s == nil || s.roots == nil {
		return fmt.Errorf("trust bundle %q has not been received over SDS; refusing to connect unverified", spec.rootsSecret)
	}
	roots := s.roots
	if len(cs.PeerCertificates) == 0 {
		return errors.New("server sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("server certificate does not verify to the trust bundle: %v", err)
	}
	if len(spec.sans) == 0 {
		return nil
	}
	var seen []string
	for _, m := range spec.sans {
		for _, v := range sanValues(leaf, m.typ) {
			if m.match(v) {
				return nil
			}
		}
	}
	for _, u := range leaf.URIs {
		seen = append(seen, u.String())
	}
	seen = append(seen, leaf.DNSNames...)
	return fmt.Errorf("server certificate SANs %q match none of the expected identities", seen)
}

func sanValues(c *x509.Certificate, t tlsv3.SubjectAltNameMatcher_SanType) []string {
	switch t {
	case tlsv3.SubjectAltNameMatcher_URI:
		out := make([]string, 0, len(c.URIs))
		for _, u := range c.URIs {
			out = append(out, u.String())
		}
		return out
	case tlsv3.SubjectAltNameMatcher_DNS:
		return c.DNSNames
	case tlsv3.SubjectAltNameMatcher_EMAIL:
		return c.EmailAddresses
	case tlsv3.SubjectAltNameMatcher_IP_ADDRESS:
		out := make([]string, 0, len(c.IPAddresses))
		for _, ip := range c.IPAddresses {
			out = append(out, ip.String())
		}
		return out
	}
	return nil
}

// clientCertificate is the cluster's client certificate of the moment (SDS may rotate it).
func (dp *DataPlane) clientCertificate(spec *tlsSpec) (*tls.Certificate, error) {
	if spec.certSecret == "" {
		return &tls.Certificate{}, nil
	}
	s := dp.secret(spec.certSecret)
	if s == nil || s.cert == nil {
		return nil, fmt.Errorf("client certificate %q has not been received over SDS", spec.certSecret)
	}
	return s.cert, nil
}

// hostsString describes endpoints for status output.
func (c *cluster) hostsString() string {
	var parts []string
	for _, h := range *c.hosts.Load() {
		s := h.addr
		if h.ejected.Load() {
			s += "(ejected)"
		}
		parts = append(parts, s)
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

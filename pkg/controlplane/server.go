package controlplane

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/ratelog"
	"github.com/fwdproxy/fwdproxy/internal/xdslimit"
)

// fleetKey is the one snapshot key: every data plane that connects (and authenticates, see
// transport.go), whatever its node ID, is served the fleet's configuration.
const fleetKey = "fleet"

type fleetHash struct{}

func (fleetHash) ID(*core.Node) string { return fleetKey }

// Server serves the current snapshot over ADS (state-of-the-world and delta) and SDS, and keeps
// track of what its clients acknowledged.
type Server struct {
	cache   cache.SnapshotCache // state of the world
	delta   *deltaCache         // delta (see deltacache.go)
	xds     serverv3.Server
	log     *slog.Logger
	metrics *xdsMetrics

	mu      sync.Mutex
	current *Snapshot
	streams map[int64]*stream
	// nonces maps a delta response nonce to the version it carried, to recognise delta ACKs.
	nonces map[string]string
	// sent maps a SotW response nonce to the version it carried, so a NACK can name the version
	// that was rejected.
	sent map[string]string
	// dataPlane says which clients are this instance's data plane (SetDataPlane).
	dataPlane func(Client) bool
	// logLimit keeps a client that NACKs in a loop from flooding the log (each NACK is counted).
	logLimit ratelog.Limiter
}

type stream struct {
	node  string
	peer  Peer
	acked map[string]string // type URL -> version acknowledged
}

func (st *stream) client() Client { return Client{Node: st.node, Peer: st.peer} }

// NewServer makes a server; reg receives its metrics (nil for none).
func NewServer(log *slog.Logger, reg prometheus.Registerer) *Server {
	s := &Server{
		cache:   cache.NewSnapshotCache(true, fleetHash{}, nil),
		delta:   newDeltaCache(),
		log:     log,
		metrics: newXDSMetrics(reg),
		streams: map[int64]*stream{},
		nonces:  map[string]string{},
		sent:    map[string]string{},
	}
	s.xds = serverv3.NewServer(context.Background(), nackHolding{s.cache, s}, s.callbacks())
	return s
}

// nackHolding keeps the cache from answering a NACK with the version just rejected: the cache
// answers any request whose version differs from the snapshot's, and a NACK carries the client's
// previous version, so the client would get (and reject) the same resources again, forever. Here
// the NACK is treated as holding the rejected version: the client gets the next change, or at
// once a version newer than the one it rejected.
type nackHolding struct {
	cache.SnapshotCache
	s *Server
}

func (c nackHolding) CreateWatch(req *cache.Request, sub cache.Subscription, ch chan cache.Response) (func(), error) {
	c.s.mu.Lock()
	rejected, ok := c.s.sent[req.GetResponseNonce()]
	delete(c.s.sent, req.GetResponseNonce()) // answered: ACK or NACK
	c.s.mu.Unlock()
	if req.GetErrorDetail() != nil {
		if ok {
			held := proto.Clone(req).(*discovery.DiscoveryRequest)
			held.VersionInfo = rejected
			req = held
		}
	}
	return c.SnapshotCache.CreateWatch(req, sub, ch)
}

// CreateDeltaWatch serves delta streams from the delta cache. A delta NACK needs no holding: the
// stream's state already records the rejected versions as sent, so nothing is resent until the
// next change.
func (c nackHolding) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	return c.s.delta.CreateDeltaWatch(req, sub, ch)
}

// Set serves snap to every client, now and on connect.
func (s *Server) Set(ctx context.Context, snap *Snapshot) error {
	handed := time.Now() // the snapshot's time: delta clients may have it before Set returns
	if err := s.cache.SetSnapshot(ctx, fleetKey, snap.Cache); err != nil {
		return err
	}
	if err := s.delta.set(snap.Cache, snap.base, snap.changed); err != nil {
		return err
	}
	s.mu.Lock()
	s.current = snap
	s.mu.Unlock()
	s.metrics.setSnapshot(snap, handed)
	return nil
}

// Current is the snapshot being served, or nil.
func (s *Server) Current() *Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.current
}

// SetDataPlane tells the server which clients are this instance's own data plane: only they
// count in Status (readiness) and in fwdproxy_xds_nacks_total; the NACKs of any other client
// are logged at warning level and counted in fwdproxy_xds_foreign_nacks_total. Without it
// every client counts. f is called with the server's lock held and must not call back.
func (s *Server) SetDataPlane(f func(Client) bool) {
	s.mu.Lock()
	s.dataPlane = f
	s.mu.Unlock()
}

// isDataPlane applies the SetDataPlane predicate; callers hold s.mu.
func (s *Server) isDataPlane(st *stream) bool {
	return s.dataPlane == nil || s.dataPlane(st.client())
}

// Register adds the ADS and SDS services to g. Its connections carry no Peer transport, so
// with SetDataPlane they count as foreign clients.
func (s *Server) Register(g *grpc.Server) {
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	secretservice.RegisterSecretDiscoveryServiceServer(g, s.xds)
}

// ServeUnix serves on a Unix socket listener (see localsock.Listen) until ctx is done,
// admitting only the connections whose peer credentials p allows; refusals are logged.
func (s *Server) ServeUnix(ctx context.Context, lis net.Listener, p localsock.Policy) error {
	guarded := localsock.Guard(lis, p, func(c localsock.Cred, err error) {
		s.log.Warn("xDS connection refused: this local user may not fetch the fleet's configuration and key",
			"peer", c.String(), "reason", err.Error())
	})
	return s.Serve(ctx, guarded, localCreds{transport: UnixSocket})
}

// ServeInProcess serves the in-process listener (the built-in data plane) until ctx is done.
func (s *Server) ServeInProcess(ctx context.Context, lis *InProcessListener) error {
	return s.Serve(ctx, lis.l, localCreds{transport: InProcess})
}

// ServeTLS serves on a TCP listener until ctx is done, with cfg, which must require and verify
// client certificates.
func (s *Server) ServeTLS(ctx context.Context, lis net.Listener, cfg *tls.Config) error {
	creds, err := tlsCreds(cfg)
	if err != nil {
		return err
	}
	return s.Serve(ctx, lis, creds)
}

// Serve serves on lis until ctx is done, authenticating connections with creds. The daemon
// uses ServeUnix, ServeInProcess and ServeTLS; insecure credentials are for tests only.
func (s *Server) Serve(ctx context.Context, lis net.Listener, creds credentials.TransportCredentials) error {
	g := grpc.NewServer(
		grpc.Creds(creds),
		grpc.MaxConcurrentStreams(1000),
		// A response holds every resource of its type and a request may name every route,
		// endpoint or secret: both go up to the limit every fwdproxy data plane takes (gRPC
		// would otherwise receive 4 MiB, about 3,500 services). The snapshot builder keeps
		// responses under it.
		grpc.MaxSendMsgSize(xdslimit.MaxMessageBytes),
		grpc.MaxRecvMsgSize(xdslimit.MaxMessageBytes),
		// A data plane busy applying a large configuration answers no ping: Envoy's main thread,
		// which also runs its ADS stream, takes about 100 s to add 10,000 listeners on 2 cores.
		// Dropping the stream then would make it fetch (and apply) everything again. A data
		// plane that dies closes its socket anyway; this only catches a silent network.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 5 * time.Minute}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	s.Register(g)
	go func() {
		<-ctx.Done()
		g.GracefulStop()
	}()
	return g.Serve(lis)
}

// Status describes the clients and what they acknowledged.
type Status struct {
	// Clients counts open xDS streams, of any client.
	Clients int
	// AckedCurrent counts data planes (by node ID, over all their streams; only this instance's
	// own, see SetDataPlane) that acknowledged the current listeners, clusters and secrets.
	AckedCurrent int
	// AckedAny counts data planes that acknowledged some listeners and clusters, current or not:
	// after a NACK they keep serving the last configuration they accepted.
	AckedAny int
}

// Status reports the server's clients.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Clients: len(s.streams)}
	if s.current == nil {
		return st
	}
	lv := s.current.Cache.GetVersion(resource.ListenerType)
	cv := s.current.Cache.GetVersion(resource.ClusterType)
	sv := s.current.Cache.GetVersion(resource.SecretType)
	// Envoy uses one ADS stream for every type; other clients may open one stream per type.
	// Without the secrets a data plane cannot originate mTLS, so they count when there are any.
	type acks struct{ listeners, clusters, secrets, anyListeners, anyClusters, anySecrets bool }
	nodes := map[string]*acks{}
	for id, str := range s.streams {
		if !s.isDataPlane(str) {
			continue // another client: served, but it says nothing about this instance
		}
		key := str.node
		if key == "" {
			key = fmt.Sprintf("stream-%d", id)
		}
		a := nodes[key]
		if a == nil {
			a = &acks{}
			nodes[key] = a
		}
		a.listeners = a.listeners || str.acked[resource.ListenerType] == lv
		a.clusters = a.clusters || str.acked[resource.ClusterType] == cv
		a.secrets = a.secrets || sv == "" || str.acked[resource.SecretType] == sv
		a.anyListeners = a.anyListeners || str.acked[resource.ListenerType] != ""
		a.anyClusters = a.anyClusters || str.acked[resource.ClusterType] != ""
		a.anySecrets = a.anySecrets || sv == "" || str.acked[resource.SecretType] != ""
	}
	for _, a := range nodes {
		if a.listeners && a.clusters && a.secrets {
			st.AckedCurrent++
		}
		if a.anyListeners && a.anyClusters && a.anySecrets {
			st.AckedAny++
		}
	}
	return st
}

func (s *Server) open(ctx context.Context, id int64) {
	p := peerOf(ctx)
	s.mu.Lock()
	s.streams[id] = &stream{peer: p, acked: map[string]string{}}
	n := len(s.streams)
	s.mu.Unlock()
	s.metrics.clients.Set(float64(n))
}

func (s *Server) closed(id int64) {
	s.mu.Lock()
	delete(s.streams, id)
	n := len(s.streams)
	s.mu.Unlock()
	s.metrics.clients.Set(float64(n))
}

// request records an ACK or a NACK. A NACK keeps the client on its last good configuration
// (Envoy's behaviour). From this instance's data plane we log it loudly and count it, since it
// means translation emitted something the data plane could not apply; from another client it is
// that client's business, so it is only a warning, counted apart, and raises no alert.
func (s *Server) request(id int64, node *core.Node, typeURL, version, nonce string, status interface{ GetMessage() string }, isErr bool) {
	s.mu.Lock()
	st := s.streams[id]
	named := false
	if st != nil && node != nil && node.GetId() != "" && st.node != node.GetId() {
		st.node = node.GetId()
		named = true
	}
	var c Client
	own := true
	if st != nil {
		c, own = st.client(), s.isDataPlane(st)
	}
	if !isErr && st != nil && version != "" {
		st.acked[typeURL] = version
	}
	s.mu.Unlock()
	if named && !own {
		s.log.Info("xDS client is not this instance's data plane: served, but it does not count for readiness or NACK alerts",
			"node", c.Node, "peer", c.Peer.String())
	}
	switch {
	case isErr && own:
		s.metrics.nacks.WithLabelValues(TypeName(typeURL)).Inc()
		if ok, left := s.logLimit.Allow(c.Node + "/" + typeURL); ok {
			s.log.Error("xDS client rejected configuration; it keeps its last good one",
				"node", c.Node, "type", TypeName(typeURL), "nonce", nonce, "error", status.GetMessage(), "not_logged_since_last", left)
		}
	case isErr:
		// Logged before counted: whoever sees the count finds the log line.
		s.log.Warn("xDS client that is not this instance's data plane rejected configuration",
			"node", c.Node, "peer", c.Peer.String(), "type", TypeName(typeURL), "nonce", nonce, "error", status.GetMessage())
		s.metrics.foreignNacks.WithLabelValues(TypeName(typeURL)).Inc()
	}
}

func (s *Server) callbacks() serverv3.CallbackFuncs {
	return serverv3.CallbackFuncs{
		StreamOpenFunc:      func(ctx context.Context, id int64, _ string) error { s.open(ctx, id); return nil },
		StreamClosedFunc:    func(id int64, _ *core.Node) { s.closed(id) },
		DeltaStreamOpenFunc: func(ctx context.Context, id int64, _ string) error { s.open(ctx, id); return nil },
		DeltaStreamClosedFunc: func(id int64, _ *core.Node) {
			s.closed(id)
		},
		StreamRequestFunc: func(id int64, r *discovery.DiscoveryRequest) error {
			s.request(id, r.GetNode(), r.GetTypeUrl(), r.GetVersionInfo(), r.GetResponseNonce(), r.GetErrorDetail(), r.GetErrorDetail() != nil)
			return nil
		},
		StreamResponseFunc: func(_ context.Context, _ int64, _ *discovery.DiscoveryRequest, r *discovery.DiscoveryResponse) {
			s.metrics.pushes.WithLabelValues(TypeName(r.GetTypeUrl())).Inc()
			s.metrics.resources.WithLabelValues(TypeName(r.GetTypeUrl())).Add(float64(len(r.GetResources())))
			s.mu.Lock()
			if len(s.sent) > 10000 { // a client that never answers must not grow this forever
				clear(s.sent)
			}
			s.sent[r.GetNonce()] = r.GetVersionInfo()
			s.mu.Unlock()
		},
		StreamDeltaRequestFunc: func(id int64, r *discovery.DeltaDiscoveryRequest) error {
			version := ""
			if r.GetResponseNonce() != "" {
				s.mu.Lock()
				version = s.nonces[r.GetResponseNonce()]
				delete(s.nonces, r.GetResponseNonce())
				s.mu.Unlock()
			}
			s.request(id, r.GetNode(), r.GetTypeUrl(), version, r.GetResponseNonce(), r.GetErrorDetail(), r.GetErrorDetail() != nil)
			return nil
		},
		StreamDeltaResponseFunc: func(_ int64, _ *discovery.DeltaDiscoveryRequest, r *discovery.DeltaDiscoveryResponse) {
			s.metrics.pushes.WithLabelValues(TypeName(r.GetTypeUrl())).Inc()
			s.metrics.resources.WithLabelValues(TypeName(r.GetTypeUrl())).Add(float64(len(r.GetResources()) + len(r.GetRemovedResources())))
			s.mu.Lock()
			if len(s.nonces) > 10000 { // a client that never answers must not grow this forever
				clear(s.nonces)
			}
			// The snapshot's version of the type the response brings the client to (the cache
			// sets it), even if a newer snapshot was set meanwhile.
			s.nonces[r.GetNonce()] = r.GetSystemVersionInfo()
			s.mu.Unlock()
		},
	}
}

// TypeName shortens an xDS type URL for logs, errors and metric labels: "listener", "route",
// "cluster", "endpoint", "secret"; other types by their last name segment.
func TypeName(typeURL string) string {
	switch typeURL {
	case resource.ListenerType:
		return "listener"
	case resource.RouteType:
		return "route"
	case resource.ClusterType:
		return "cluster"
	case resource.EndpointType:
		return "endpoint"
	case resource.SecretType:
		return "secret"
	}
	return typeURL[strings.LastIndex(typeURL, ".")+1:]
}

type xdsMetrics struct {
	clients      prometheus.Gauge
	pushes       *prometheus.CounterVec
	resources    *prometheus.CounterVec
	nacks        *prometheus.CounterVec
	foreignNacks *prometheus.CounterVec
	info         *prometheus.GaugeVec
	updates      prometheus.Counter
	snapTime     prometheus.Gauge
}

func newXDSMetrics(reg prometheus.Registerer) *xdsMetrics {
	m := &xdsMetrics{
		clients: prometheus.NewGauge(prometheus.GaugeOpts{Name: "fwdproxy_xds_connected_clients", Help: "xDS streams currently open."}),
		pushes:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_xds_pushes_total", Help: "xDS responses sent, by resource type."}, []string{"type"}),
		resources: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_xds_resources_sent_total",
			Help: "Resources carried by xDS responses (delta: changed and removed ones; state of the world: all), by resource type."}, []string{"type"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_xds_nacks_total", Help: "xDS responses rejected by this instance's data plane, by resource type."}, []string{"type"}),
		foreignNacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_xds_foreign_nacks_total",
			Help: "xDS responses rejected by clients that are not this instance's data plane (not alerted on), by resource type."}, []string{"type"}),
		info: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "fwdproxy_snapshot_info",
			Help: "The snapshot being served (value 1); config_version is identical on converged peers."}, []string{"config_version", "secrets_version"}),
		updates:  prometheus.NewCounter(prometheus.CounterOpts{Name: "fwdproxy_snapshot_updates_total", Help: "Snapshots published to the xDS cache."}),
		snapTime: prometheus.NewGauge(prometheus.GaugeOpts{Name: "fwdproxy_snapshot_last_update_timestamp_seconds", Help: "When the served snapshot was last replaced."}),
	}
	for _, t := range []string{"listener", "route", "cluster", "endpoint", "secret"} {
		m.pushes.WithLabelValues(t)
		m.resources.WithLabelValues(t)
		m.nacks.WithLabelValues(t)
		m.foreignNacks.WithLabelValues(t)
	}
	if reg != nil {
		reg.MustRegister(m.clients, m.pushes, m.resources, m.nacks, m.foreignNacks, m.info, m.updates, m.snapTime)
	}
	return m
}

func (m *xdsMetrics) setSnapshot(s *Snapshot, handed time.Time) {
	m.info.Reset()
	m.info.WithLabelValues(s.ConfigVersion, s.SecretsVersion).Set(1)
	m.updates.Inc()
	m.snapTime.Set(float64(handed.UnixNano()) / 1e9)
}

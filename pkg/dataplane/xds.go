package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// subscription is what the data plane asked for of one resource type, and what it accepted.
type subscription struct {
	typeURL  string
	wildcard bool     // LDS and CDS: everything
	names    []string // RDS, EDS, SDS: what the accepted listeners and clusters reference
	version  string   // last accepted
	nonce    string   // last received on this stream
	// rejected is the last version rejected and repeats how often it came back in a row: a
	// control plane answers a NACK with the same response, so repeated NACKs are slowed down.
	rejected string
	repeats  int
}

// Requests go out in Envoy's order: clusters before their endpoints, listeners before routes.
var typeOrder = []string{resource.ClusterType, resource.EndpointType, resource.SecretType, resource.ListenerType, resource.RouteType}

func newSubscriptions() map[string]*subscription {
	m := map[string]*subscription{}
	for _, t := range typeOrder {
		m[t] = &subscription{typeURL: t, wildcard: t == resource.ListenerType || t == resource.ClusterType}
	}
	return m
}

func typeName(typeURL string) string {
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

// Target turns a control plane address into a gRPC target: a path or unix:PATH is a Unix
// socket, anything else host:port.
func Target(addr string) string {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		return addr
	case strings.HasPrefix(addr, "/"):
		return "unix://" + addr
	}
	return addr
}

func (dp *DataPlane) runXDS(ctx context.Context) error {
	target := Target(dp.opts.ServerAddress)
	creds := insecure.NewCredentials() // a Unix socket (the server checks who connects) or in process
	switch {
	case dp.opts.Dialer != nil:
		target = "passthrough:///" + dp.opts.ServerAddress
	case dp.opts.TLS != nil:
		creds = credentials.NewTLS(dp.opts.TLS)
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		// One state-of-the-world response carries every resource of its type: gRPC's default
		// 4 MiB receive limit is a catalog of about 3,500 services. The control plane never
		// builds a response over xdslimit.MaxMessageBytes, so taking that much means every
		// configuration it can produce is received.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(dp.opts.MaxMessageBytes), grpc.MaxCallSendMsgSize(dp.opts.MaxMessageBytes)),
	}
	if dp.opts.Dialer != nil {
		opts = append(opts, grpc.WithContextDialer(dp.opts.Dialer))
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return fmt.Errorf("control plane address %q: %w", dp.opts.ServerAddress, err)
	}
	defer conn.Close()
	client := discoverypb.NewAggregatedDiscoveryServiceClient(conn)
	const initial = 200 * time.Millisecond
	backoff := initial
	for {
		progressed, err := dp.session(ctx, client)
		dp.setConnected(false)
		if ctx.Err() != nil {
			return nil
		}
		tooLarge := status.Code(err) == codes.ResourceExhausted
		if progressed && !tooLarge {
			backoff = initial
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		if tooLarge {
			// The control plane keeps its responses under xdslimit.MaxMessageBytes, so this is a
			// control plane with another limit (or a data plane configured lower): the same
			// response comes back on every attempt, hence the backoff is not reset.
			dp.metrics.xdsReceiveErrors.WithLabelValues("too_large").Inc()
			msg := fmt.Sprintf("a response was larger than this data plane takes (limit %d bytes): %s", dp.opts.MaxMessageBytes, status.Convert(err).Message())
			dp.mu.Lock()
			dp.lastNACK = msg
			dp.mu.Unlock()
			dp.log.Error("configuration from the control plane larger than this data plane takes; keeping the last good one and retrying",
				"server", dp.opts.ServerAddress, "limit_bytes", dp.opts.MaxMessageBytes, "error", status.Convert(err).Message(),
				"retry_in", wait.Round(time.Millisecond).String())
		} else {
			dp.log.Warn("control plane stream ended; serving the last configuration and reconnecting",
				"server", dp.opts.ServerAddress, "error", err, "retry_in", wait.Round(time.Millisecond).String())
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		backoff = min(2*backoff, dp.opts.MaxBackoff)
	}
}

func (dp *DataPlane) setConnected(v bool) {
	dp.mu.Lock()
	dp.connected = v
	dp.mu.Unlock()
	if v {
		dp.metrics.xdsConnected.Set(1)
	} else {
		dp.metrics.xdsConnected.Set(0)
	}
}

// session runs one ADS stream; progressed reports whether any response arrived.
func (dp *DataPlane) session(ctx context.Context, client discoverypb.AggregatedDiscoveryServiceClient) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.StreamAggregatedResources(ctx)
	if err != nil {
		return false, err
	}
	node := &core.Node{Id: dp.opts.NodeID, Cluster: dp.opts.NodeCluster, UserAgentName: "fwdproxy-dataplane"}
	send := func(s *subscription, nackErr error) error {
		req := &discoverypb.DiscoveryRequest{
			VersionInfo: s.version, Node: node, TypeUrl: s.typeURL, ResponseNonce: s.nonce,
		}
		if !s.wildcard {
			req.ResourceNames = s.names
		}
		if nackErr != nil {
			req.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: nackErr.Error()}
		}
		return stream.Send(req)
	}
	for _, t := range typeOrder {
		s := dp.subs[t]
		s.nonce = ""
		if s.wildcard || len(s.names) > 0 {
			if err := send(s, nil); err != nil {
				return false, err
			}
		}
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return progressed, err
		}
		if !progressed {
			progressed = true
			dp.setConnected(true)
			dp.log.Info("connected to the control plane", "server", dp.opts.ServerAddress)
		}
		s := dp.subs[resp.GetTypeUrl()]
		if s == nil {
			dp.log.Warn("ignoring a response of a type never requested", "type", resp.GetTypeUrl())
			continue
		}
		s.nonce = resp.GetNonce()
		applyErr := dp.apply(resp)
		switch {
		case applyErr != nil && resp.GetVersionInfo() == s.rejected && s.rejected != "":
			// The same rejected config again: NACK it again, but not in a tight loop.
			s.repeats++
			wait := min(250*time.Millisecond<<min(s.repeats-1, 8), 5*time.Second)
			select {
			case <-ctx.Done():
				return progressed, ctx.Err()
			case <-time.After(wait):
			}
		case applyErr != nil:
			s.rejected, s.repeats = resp.GetVersionInfo(), 0
			dp.metrics.xdsRejections.WithLabelValues(typeName(s.typeURL)).Inc()
			dp.mu.Lock()
			dp.lastNACK = applyErr.Error()
			dp.mu.Unlock()
			dp.log.Error("rejected configuration from the control plane; keeping the last good one",
				"type", typeName(s.typeURL), "version", resp.GetVersionInfo(), "error", applyErr)
		default:
			dp.mu.Lock() // Status reads versions
			s.version = resp.GetVersionInfo()
			dp.mu.Unlock()
			s.rejected, s.repeats = "", 0
			dp.log.Debug("applied configuration", "type", typeName(s.typeURL), "version", s.version, "resources", len(resp.GetResources()))
		}
		if err := send(s, applyErr); err != nil {
			return progressed, err
		}
		// Accepted listeners and clusters may reference new routes, endpoints and secrets.
		for _, t := range typeOrder {
			sub := dp.subs[t]
			if sub.wildcard {
				continue
			}
			want := dp.wanted(t)
			if !slices.Equal(want, sub.names) {
				sub.names = want
				dp.prune(t, want)
				if err := send(sub, nil); err != nil {
					return progressed, err
				}
			}
		}
		dp.updateReady()
	}
}

// wanted lists the names of a non-wildcard type that the accepted config references.
func (dp *DataPlane) wanted(typeURL string) []string {
	set := map[string]bool{}
	switch typeURL {
	case resource.RouteType:
		for _, l := range dp.listeners {
			if n := l.cfg.Load().routeName(); n != "" {
				set[n] = true
			}
		}
	case resource.EndpointType:
		for _, c := range *dp.clusters.Load() {
			if n := c.rt.Load().cfg.edsName; n != "" {
				set[n] = true
			}
		}
	case resource.SecretType:
		for _, l := range dp.listeners { // the inbound listener's downstream TLS (inbound.go)
			for _, n := range l.cfg.Load().secretNames() {
				set[n] = true
			}
		}
		for _, c := range *dp.clusters.Load() {
			if t := c.rt.Load().cfg.tls; t != nil {
				for _, n := range []string{t.certSecret, t.rootsSecret} {
					if n != "" {
						set[n] = true
					}
				}
			}
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// prune forgets resources no longer referenced.
func (dp *DataPlane) prune(typeURL string, names []string) {
	keep := func(n string) bool { _, ok := slices.BinarySearch(names, n); return ok }
	switch typeURL {
	case resource.RouteType:
		m := map[string]*routeTable{}
		for n, r := range *dp.routes.Load() {
			if keep(n) {
				m[n] = r
			}
		}
		dp.routes.Store(&m)
	case resource.EndpointType:
		for n := range dp.endpoints {
			if !keep(n) {
				delete(dp.endpoints, n)
			}
		}
	case resource.SecretType:
		m := map[string]*secret{}
		for n, s := range *dp.secrets.Load() {
			if keep(n) {
				m[n] = s
			}
		}
		dp.secrets.Store(&m)
	}
}

func (dp *DataPlane) updateReady() {
	ready := dp.subs[resource.ListenerType].version != "" && dp.subs[resource.ClusterType].version != ""
	routes, secrets := *dp.routes.Load(), *dp.secrets.Load()
	for _, n := range dp.subs[resource.RouteType].names {
		ready = ready && routes[n] != nil
	}
	for _, n := range dp.subs[resource.EndpointType].names {
		_, ok := dp.endpoints[n]
		ready = ready && ok
	}
	for _, n := range dp.subs[resource.SecretType].names {
		ready = ready && secrets[n] != nil
	}
	dp.mu.Lock()
	if ready && !dp.ready {
		dp.log.Info("data plane ready", "listeners", len(dp.listeners), "clusters", len(*dp.clusters.Load()))
	}
	dp.ready = ready
	dp.serving = dp.serving || ready
	dp.mu.Unlock()
}

// decode unpacks a response's resources into T, checking each one's type.
func decode[T proto.Message](resp *discoverypb.DiscoveryResponse, newT func() T) ([]T, error) {
	out := make([]T, 0, len(resp.GetResources()))
	for i, a := range resp.GetResources() {
		if a.GetTypeUrl() == resource.APITypePrefix+"envoy.service.discovery.v3.Resource" {
			r := &discoverypb.Resource{}
			if err := a.UnmarshalTo(r); err != nil {
				return nil, fmt.Errorf("resources[%d]: %v", i, err)
			}
			a = r.GetResource()
		}
		if a.GetTypeUrl() != resp.GetTypeUrl() {
			return nil, fmt.Errorf("resources[%d]: type %s in a %s response", i, a.GetTypeUrl(), resp.GetTypeUrl())
		}
		m := newT()
		if err := anypb.UnmarshalTo(a, m, proto.UnmarshalOptions{}); err != nil {
			return nil, fmt.Errorf("resources[%d]: cannot decode %s: %v", i, a.GetTypeUrl(), err)
		}
		out = append(out, m)
	}
	return out, nil
}

// apply checks a whole response and applies it only if every resource is acceptable.
func (dp *DataPlane) apply(resp *discoverypb.DiscoveryResponse) error {
	switch resp.GetTypeUrl() {
	case resource.ListenerType:
		ls, err := decode(resp, func() *listener.Listener { return &listener.Listener{} })
		if err != nil {
			return err
		}
		return dp.applyListeners(ls)
	case resource.RouteType:
		rs, err := decode(resp, func() *route.RouteConfiguration { return &route.RouteConfiguration{} })
		if err != nil {
			return err
		}
		return dp.applyRoutes(rs)
	case resource.ClusterType:
		cs, err := decode(resp, func() *clusterpb.Cluster { return &clusterpb.Cluster{} })
		if err != nil {
			return err
		}
		return dp.applyClusters(cs)
	case resource.EndpointType:
		es, err := decode(resp, func() *endpoint.ClusterLoadAssignment { return &endpoint.ClusterLoadAssignment{} })
		if err != nil {
			return err
		}
		return dp.applyEndpoints(es)
	case resource.SecretType:
		ss, err := decode(resp, func() *tlsv3.Secret { return &tlsv3.Secret{} })
		if err != nil {
			return err
		}
		return dp.applySecrets(ss)
	}
	return fmt.Errorf("resource type %s is not supported", resp.GetTypeUrl())
}

func (dp *DataPlane) applyListeners(ls []*listener.Listener) error {
	byAddr := map[string]*listenerConfig{}
	names := map[string]bool{}
	var errs []error
	for _, l := range ls {
		cfg, err := dp.parseListener(l, dp.opts.ListenAddress)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if names[cfg.name] {
			errs = append(errs, fmt.Errorf("listener %q: listed twice", cfg.name))
			continue
		}
		names[cfg.name] = true
		if prev := byAddr[cfg.addr]; prev != nil {
			errs = append(errs, fmt.Errorf("listener %q: address %s is also bound by listener %q", cfg.name, cfg.addr, prev.name))
			continue
		}
		byAddr[cfg.addr] = cfg
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// Bind the new addresses first: if one cannot be bound, nothing changes.
	fresh := map[string]*listenerRT{}
	for addr, cfg := range byAddr {
		if dp.listeners[addr] != nil {
			continue
		}
		l, err := dp.bind(cfg)
		if err != nil {
			for _, f := range fresh {
				f.ln.Close()
			}
			return fmt.Errorf("listener %q: cannot listen on %s: %v", cfg.name, addr, err)
		}
		fresh[addr] = l
	}
	dp.mu.Lock()
	for addr, l := range dp.listeners {
		cfg, keep := byAddr[addr]
		if keep {
			if !proto.Equal(l.cfg.Load().proto, cfg.proto) {
				l.cfg.Store(cfg)
				l.reconfigure(cfg)
				dp.log.Info("listener updated in place", "listener", cfg.name, "address", addr)
			}
			continue
		}
		delete(dp.listeners, addr)
		dp.log.Info("listener removed; draining", "listener", l.cfg.Load().name, "address", addr, "drain_time", dp.opts.DrainTime.String())
		dp.draining.Go(func() { l.drain(dp.opts.DrainTime) })
	}
	for addr, l := range fresh {
		l.start()
		dp.listeners[addr] = l
		dp.log.Info("listener added", "listener", l.cfg.Load().name, "address", l.ln.Addr().String())
	}
	dp.listenerCount.Store(int64(len(dp.listeners)))
	dp.mu.Unlock()
	return nil
}

func (dp *DataPlane) applyRoutes(rs []*route.RouteConfiguration) error {
	m := maps.Clone(*dp.routes.Load())
	var errs []error
	for _, r := range rs {
		t, err := parseRouteConfig(r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		m[t.name] = t
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	dp.routes.Store(&m)
	return nil
}

func (dp *DataPlane) applyClusters(cs []*clusterpb.Cluster) error {
	cfgs := map[string]*clusterConfig{}
	var errs []error
	for _, c := range cs {
		cfg, err := dp.parseCluster(c)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if cfgs[cfg.name] != nil {
			errs = append(errs, fmt.Errorf("cluster %q: listed twice", cfg.name))
			continue
		}
		cfgs[cfg.name] = cfg
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	old := *dp.clusters.Load()
	m := make(map[string]*cluster, len(cfgs))
	for name, cfg := range cfgs {
		c := old[name]
		switch {
		case c == nil:
			c = newCluster(dp, cfg)
		case !proto.Equal(c.rt.Load().cfg.proto, cfg.proto):
			c.setConfig(cfg)
		default:
			m[name] = c
			continue
		}
		if len(cfg.dns) > 0 {
			// resolved by the cluster's own loop (health.go)
		} else if cfg.edsName == "" {
			c.setEndpoints(cfg.static)
		} else if eps, ok := dp.endpoints[cfg.edsName]; ok {
			c.setEndpoints(eps)
		}
		m[name] = c
	}
	dp.clusters.Store(&m)
	for name, c := range old {
		if m[name] == nil {
			c.close()
		}
	}
	return nil
}

func (dp *DataPlane) applyEndpoints(es []*endpoint.ClusterLoadAssignment) error {
	parsed := map[string][]endpointSpec{}
	var errs []error
	for _, e := range es {
		eps, err := parseCLA(e)
		if err != nil {
			errs = append(errs, fmt.Errorf("endpoints %q: %v", e.GetClusterName(), err))
			continue
		}
		parsed[e.GetClusterName()] = eps
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	for name, eps := range parsed {
		dp.endpoints[name] = eps
	}
	for _, c := range *dp.clusters.Load() {
		if eps, ok := parsed[c.rt.Load().cfg.edsName]; ok {
			c.setEndpoints(eps)
		}
	}
	return nil
}

func (dp *DataPlane) applySecrets(ss []*tlsv3.Secret) error {
	m := maps.Clone(*dp.secrets.Load())
	var errs []error
	for _, s := range ss {
		p, err := parseSecret(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		m[p.name] = p
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	dp.secrets.Store(&m)
	return nil
}

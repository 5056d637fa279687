package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
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

	"github.com/fwdproxy/fwdproxy/internal/backoff"
)

// subscription is what the data plane asked for of one resource type, and what it accepted.
type subscription struct {
	typeURL  string
	wildcard bool     // LDS and CDS: everything
	names    []string // RDS, EDS, SDS: what the accepted listeners and clusters reference
	version  string   // the control plane's version of the type when last accepted
	// accepted are the resources accepted, by name: on a new stream their versions tell the
	// control plane what to leave out, and listeners and clusters are applied as a whole set.
	accepted map[string]acceptedResource
}

type acceptedResource struct {
	version string
	msg     proto.Message
}

// Requests go out in Envoy's order: clusters before their endpoints, listeners before routes.
var typeOrder = []string{resource.ClusterType, resource.EndpointType, resource.SecretType, resource.ListenerType, resource.RouteType}

func newSubscriptions() map[string]*subscription {
	m := map[string]*subscription{}
	for _, t := range typeOrder {
		m[t] = &subscription{typeURL: t, wildcard: t == resource.ListenerType || t == resource.ClusterType, accepted: map[string]acceptedResource{}}
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
		// The first response of a stream carries every resource of its type: gRPC's default
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
	bo := backoff.New(backoff.Spread(200*time.Millisecond, dp.opts.MaxBackoff))
	for {
		progressed, err := dp.session(ctx, client)
		dp.setConnected(false)
		if ctx.Err() != nil {
			return nil
		}
		tooLarge := status.Code(err) == codes.ResourceExhausted
		if progressed && !tooLarge {
			bo.Reset()
		}
		wait := bo.Next()
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

// session runs one delta ADS stream; progressed reports whether any response arrived. Delta
// xDS sends what changed (and what was removed) rather than every resource of a type, so a change
// to one service costs its own resources on the wire and here.
func (dp *DataPlane) session(ctx context.Context, client discoverypb.AggregatedDiscoveryServiceClient) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.DeltaAggregatedResources(ctx)
	if err != nil {
		return false, err
	}
	node := &core.Node{Id: dp.opts.NodeID, Cluster: dp.opts.NodeCluster, UserAgentName: "fwdproxy-dataplane"}
	send := func(req *discoverypb.DeltaDiscoveryRequest) error {
		if node != nil { // the node goes on the stream's first request only
			req.Node, node = node, nil
		}
		return stream.Send(req)
	}
	for _, t := range typeOrder {
		s := dp.subs[t]
		req := &discoverypb.DeltaDiscoveryRequest{TypeUrl: t, InitialResourceVersions: map[string]string{}}
		for name, r := range s.accepted {
			req.InitialResourceVersions[name] = r.version
		}
		switch {
		case s.wildcard:
			req.ResourceNamesSubscribe = []string{"*"}
		case len(s.names) > 0:
			req.ResourceNamesSubscribe = s.names
		default:
			continue
		}
		if err := send(req); err != nil {
			return false, err
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
		applyErr := dp.applyDelta(s, resp)
		if applyErr != nil {
			dp.metrics.xdsRejections.WithLabelValues(typeName(s.typeURL)).Inc()
			dp.mu.Lock()
			dp.lastNACK = applyErr.Error()
			dp.mu.Unlock()
			dp.log.Error("rejected configuration from the control plane; keeping the last good one",
				"type", typeName(s.typeURL), "version", resp.GetSystemVersionInfo(), "error", applyErr)
		} else {
			dp.mu.Lock() // Status reads versions
			s.version = resp.GetSystemVersionInfo()
			dp.mu.Unlock()
			dp.log.Debug("applied configuration", "type", typeName(s.typeURL), "version", s.version,
				"changed", len(resp.GetResources()), "removed", len(resp.GetRemovedResources()))
		}
		ack := &discoverypb.DeltaDiscoveryRequest{TypeUrl: s.typeURL, ResponseNonce: resp.GetNonce()}
		if applyErr != nil {
			ack.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: applyErr.Error()}
		}
		if err := send(ack); err != nil {
			return progressed, err
		}
		if applyErr != nil {
			continue // nothing changed: the subscriptions stand
		}
		for _, req := range dp.resubscribe(s.typeURL) {
			if err := send(req); err != nil {
				return progressed, err
			}
		}
		dp.updateReady()
	}
}

// references tells which types a type's resources name: listeners their routes (and the inbound
// listener its secrets), clusters their endpoints and secrets.
var references = map[string][]string{
	resource.ListenerType: {resource.RouteType, resource.SecretType},
	resource.ClusterType:  {resource.EndpointType, resource.SecretType},
}

// resubscribe follows what the accepted listeners and clusters reference (routes, endpoints,
// secrets) after resources of type applied were accepted: the requests that subscribe to new
// names and unsubscribe from forgotten ones.
func (dp *DataPlane) resubscribe(applied string) []*discoverypb.DeltaDiscoveryRequest {
	var out []*discoverypb.DeltaDiscoveryRequest
	for _, t := range typeOrder {
		sub := dp.subs[t]
		if sub.wildcard || !slices.Contains(references[applied], t) {
			continue
		}
		want := dp.wanted(t)
		if slices.Equal(want, sub.names) {
			continue
		}
		req := &discoverypb.DeltaDiscoveryRequest{TypeUrl: t}
		for _, n := range want {
			if _, ok := slices.BinarySearch(sub.names, n); !ok {
				req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, n)
			}
		}
		for _, n := range sub.names {
			if _, ok := slices.BinarySearch(want, n); !ok {
				req.ResourceNamesUnsubscribe = append(req.ResourceNamesUnsubscribe, n)
				delete(sub.accepted, n)
			}
		}
		sub.names = want
		dp.prune(t, want)
		out = append(out, req)
	}
	return out
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

// decodeResource unpacks one resource of a response, checking its type.
func decodeResource(typeURL string, r *discoverypb.Resource) (proto.Message, error) {
	a := r.GetResource()
	if a == nil {
		return nil, fmt.Errorf("resource %q: no content", r.GetName())
	}
	if a.GetTypeUrl() != typeURL {
		return nil, fmt.Errorf("resource %q: type %s in a %s response", r.GetName(), a.GetTypeUrl(), typeURL)
	}
	var m proto.Message
	switch typeURL {
	case resource.ListenerType:
		m = &listener.Listener{}
	case resource.RouteType:
		m = &route.RouteConfiguration{}
	case resource.ClusterType:
		m = &clusterpb.Cluster{}
	case resource.EndpointType:
		m = &endpoint.ClusterLoadAssignment{}
	case resource.SecretType:
		m = &tlsv3.Secret{}
	default:
		return nil, fmt.Errorf("resource type %s is not supported", typeURL)
	}
	if err := anypb.UnmarshalTo(a, m, proto.UnmarshalOptions{}); err != nil {
		return nil, fmt.Errorf("resource %q: cannot decode %s: %v", r.GetName(), typeURL, err)
	}
	return m, nil
}

// applyDelta checks a response's changes and applies them only if every resource is acceptable:
// listeners and clusters as the whole set they make with what was accepted before, routes,
// endpoints and secrets one by one (each is looked up by name).
func (dp *DataPlane) applyDelta(s *subscription, resp *discoverypb.DeltaDiscoveryResponse) error {
	changed := make(map[string]acceptedResource, len(resp.GetResources()))
	var errs []error
	for _, r := range resp.GetResources() {
		m, err := decodeResource(s.typeURL, r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		changed[r.GetName()] = acceptedResource{version: r.GetVersion(), msg: m}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	next := changed
	if s.wildcard {
		next = maps.Clone(s.accepted)
		for _, n := range resp.GetRemovedResources() {
			delete(next, n)
		}
		maps.Copy(next, changed)
	}
	var msgs []proto.Message
	if !s.wildcard {
		msgs = make([]proto.Message, 0, len(next))
		for _, name := range slices.Sorted(maps.Keys(next)) {
			msgs = append(msgs, next[name].msg)
		}
	}
	var err error
	switch s.typeURL {
	case resource.ListenerType:
		err = dp.applyListeners(slices.Sorted(maps.Keys(next)), next)
	case resource.RouteType:
		err = dp.applyRoutes(typed[*route.RouteConfiguration](msgs))
	case resource.ClusterType:
		err = dp.applyClusters(changed, resp.GetRemovedResources())
	case resource.EndpointType:
		err = dp.applyEndpoints(typed[*endpoint.ClusterLoadAssignment](msgs))
	case resource.SecretType:
		err = dp.applySecrets(typed[*tlsv3.Secret](msgs))
	}
	if err != nil {
		return err
	}
	if s.wildcard {
		s.accepted = next
		dp.parsedListeners.keepOnly(dp.subs[resource.ListenerType].accepted)
		dp.parsedClusters.keepOnly(dp.subs[resource.ClusterType].accepted)
		return nil
	}
	maps.Copy(s.accepted, changed)
	if removed := resp.GetRemovedResources(); len(removed) > 0 {
		for _, n := range removed {
			delete(s.accepted, n)
		}
		dp.remove(s.typeURL, removed)
	}
	return nil
}

func typed[T proto.Message](ms []proto.Message) []T {
	out := make([]T, len(ms))
	for i, m := range ms {
		out[i] = m.(T)
	}
	return out
}

// remove forgets routes, endpoints or secrets the control plane removed.
func (dp *DataPlane) remove(typeURL string, names []string) {
	gone := map[string]bool{}
	for _, n := range names {
		gone[n] = true
	}
	var keep []string
	for _, n := range dp.subs[typeURL].names {
		if !gone[n] {
			keep = append(keep, n)
		}
	}
	dp.prune(typeURL, keep)
}

// applyListeners applies the whole set of listeners, in name order; only the ones that changed
// since they were last parsed are parsed again (parsecache.go).
func (dp *DataPlane) applyListeners(order []string, ls map[string]acceptedResource) error {
	byAddr := map[string]*listenerConfig{}
	names := map[string]bool{}
	var errs []error
	for _, name := range order {
		r := ls[name]
		cfg, err := dp.parsedListeners.get(name, r, func() (*listenerConfig, error) {
			return dp.parseListener(r.msg.(*listener.Listener), dp.opts.ListenAddress)
		})
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
			if cur := l.cfg.Load(); cur != cfg && !proto.Equal(cur.proto, cfg.proto) {
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

// applyClusters applies a delta of clusters: the changed ones (parsed unless they were before,
// parsecache.go) and the removed ones; the others stay as they are.
func (dp *DataPlane) applyClusters(changed map[string]acceptedResource, removed []string) error {
	cfgs := make(map[string]*clusterConfig, len(changed))
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(changed)) {
		r := changed[name]
		cfg, err := dp.parsedClusters.get(name, r, func() (*clusterConfig, error) {
			return dp.parseCluster(r.msg.(*clusterpb.Cluster))
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cfgs[name] = cfg
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	old := *dp.clusters.Load()
	m := maps.Clone(old)
	var gone []*cluster
	for _, name := range removed {
		if c := m[name]; c != nil && cfgs[name] == nil {
			delete(m, name)
			gone = append(gone, c)
		}
	}
	for name, cfg := range cfgs {
		c := old[name]
		switch {
		case c == nil:
			c = newCluster(dp, cfg)
		case c.rt.Load().cfg != cfg && !proto.Equal(c.rt.Load().cfg.proto, cfg.proto):
			c.setConfig(cfg)
		default:
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
	for _, c := range gone {
		c.close()
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

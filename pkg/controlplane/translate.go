// Package controlplane turns the catalog and the fleet identity into Envoy configuration and
// serves it over ADS. Translate is a pure function: the same input gives byte-identical resources
// on every peer, so snapshot versions (hashes of content) can be compared across the fleet.
package controlplane

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	streamlog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Istio's wire conventions (see pilot/pkg/networking and pilot/pkg/model in Istio).
const (
	// SecretCertificate and SecretRoots are the SDS names Istio's agent serves.
	SecretCertificate = "default"
	SecretRoots       = "ROOTCA"
)

var (
	// ALPNTCP is offered for TCP over mTLS: Istio's mtlsTCPALPNs, without istio-peer-exchange.
	// A sidecar that negotiates istio-peer-exchange writes its metadata-exchange header (magic,
	// length, Any(Struct)) ahead of the application's bytes; Istio's own clients consume it with
	// their istio.metadata_exchange filter, which upstream Envoy does not have, so offering it
	// would hand those bytes to the VM's client. "istio" still matches the east-west gateway's
	// AUTO_PASSTHROUGH chains and the sidecar's STRICT inbound chain.
	ALPNTCP = []string{"istio"}
	// ALPNHTTP11 selects the sidecar's HTTP-over-mTLS filter chain for HTTP/1.1.
	ALPNHTTP11 = []string{"istio-http/1.1"}
	// ALPNH2 is offered for HTTP/2 and gRPC ports; the upstream then speaks h2 by prior knowledge.
	ALPNH2 = []string{"istio-h2"}
)

// ClusterName is Istio's outbound cluster name, outbound|PORT|SUBSET|FQDN (BuildSubsetKey).
func ClusterName(port uint32, subset, host string) string {
	return "outbound|" + strconv.Itoa(int(port)) + "|" + subset + "|" + host
}

// SNI is the name the east-west gateway routes on: Istio's BuildDNSSrvSubsetKey,
// "outbound_.PORT_.SUBSET_.FQDN", so no subset gives "outbound_.9080_._.FQDN".
func SNI(port uint32, subset, host string) string {
	return "outbound_." + strconv.Itoa(int(port)) + "_." + subset + "_." + host
}

// ALPN returns the protocols offered upstream for a port's protocol.
func ALPN(p catalog.Protocol) []string {
	switch {
	case p.UsesHTTP2Upstream():
		return ALPNH2
	case p == catalog.HTTP:
		return ALPNHTTP11
	default:
		return ALPNTCP
	}
}

// Gateway is an east-west gateway with its resolved addresses.
type Gateway struct {
	Name      string
	Network   string
	Addresses []netip.AddrPort
	// Priority orders gateways for failover (priority.go): a service reached through gateways
	// of several priorities uses the lowest (0, the local cluster's) while it has healthy
	// endpoints and fails over to the next when they are ejected.
	Priority uint32
}

// Options are the fleet-wide settings translation needs besides the catalog.
type Options struct {
	// ListenAddress is where the plain listeners bind, e.g. 0.0.0.0.
	ListenAddress string
	Gateways      []Gateway
	// ConnectTimeout to a gateway.
	ConnectTimeout time.Duration
	Outlier        Outlier
	AccessLog      bool
	// PeerMetadata, when set, is sent on every HTTP request as Istio's peer metadata headers
	// (peermetadata.go), so the mesh's telemetry names the fleet as that workload.
	PeerMetadata *PeerMetadata
	// Limits on what a client may send and open; zero values are Envoy's defaults (limits.go).
	Limits
	// Reverse, when set, adds the inbound mTLS listener for mesh callers of VM services and
	// the clusters to the VMs (inbound.go).
	Reverse *Reverse
}

// Outlier is passive health checking of gateway endpoints.
type Outlier struct {
	ConsecutiveErrors  uint32
	Interval           time.Duration
	BaseEjectionTime   time.Duration
	MaxEjectionPercent uint32
}

// Resources are the xDS resources for one catalog, each list sorted by name.
type Resources struct {
	Listeners []*listener.Listener
	Routes    []*route.RouteConfiguration
	Clusters  []*cluster.Cluster
	Endpoints []*endpoint.ClusterLoadAssignment
	// Skipped are the services left out, sorted by host (see skipped.go); the resources serve
	// every other service. Not an xDS resource: no part of the snapshot or its version.
	Skipped []SkippedService
	// packed are the Anys this translation packed from typed messages it validated (see
	// packer): the Builder does not decode them to validate them again.
	packed packedSets
}

// ListenerName is the plain listener for a port, Istio style: ADDRESS_PORT.
func ListenerName(addr string, port uint32) string { return addr + "_" + strconv.Itoa(int(port)) }

// RouteName is the route configuration of an HTTP port: the port number, as in Istio.
func RouteName(port uint32) string { return strconv.Itoa(int(port)) }

// StatPrefix is the stat prefix of a port's HTTP connection manager or TCP proxy, outbound_PORT.
// Envoy's Prometheus output takes the prefix up to the first dot as the label
// (envoy_http_conn_manager_prefix, envoy_tcp_prefix): the listener's name (ADDRESS_PORT) has dots,
// so the rest of it would end up in every metric name (envoy_http_0_0_0_9080_downstream_rq_total).
// One listen address serves every port, so the port alone names the listener.
func StatPrefix(port uint32) string { return "outbound_" + strconv.Itoa(int(port)) }

// ClusterStatName is the name a cluster's statistics are emitted under (alt_stat_name): the
// cluster name with its dots as underscores. Envoy's Prometheus output takes the cluster name up to
// the first dot as envoy_cluster_name, so outbound|9080||reviews.bookinfo.svc.cluster.local would
// give envoy_cluster_name="outbound|9080||reviews" and metric names such as
// envoy_cluster_bookinfo_svc_cluster_local_upstream_cx_total.
func ClusterStatName(name string) string { return strings.ReplaceAll(name, ".", "_") }

// Translate builds the listeners, routes, clusters and endpoints for cat, best effort: a service
// that cannot be placed is left out and listed in Resources.Skipped. See Translator.Translate.
func Translate(cat *catalog.Catalog, opts Options) (*Resources, error) {
	return new(Translator).Translate(cat, opts)
}

// Translator is Translate with a memory of its last call: a service whose definition is
// unchanged, under unchanged options, gets the very same resource objects back, so a rebuild of a
// large catalog costs what changed (the Builder skips resources it has digested before). The
// result is the same as Translate's. Safe for one goroutine; the resources it returns must not be
// modified (they are shared with later results), nor the catalogs it is given: as with
// discovery.Merger, whose results share an unchanged service's lists, a service whose lists are
// the very ones of the last call is the same service without comparing them.
type Translator struct {
	opts     Options
	services map[string]*translated // by host
	// last is the last call's result, for a change that leaves every resource name as it was
	// (see patch); hosts and invalid are its placeable services and the invalid ones it skipped.
	last    *Resources
	hosts   []string
	invalid []SkippedService
	// outs are the translations of hosts, in their order (set with hosts; nil after options change).
	outs []*translated
}

// translated is one service's share of the resources.
type translated struct {
	svc       catalog.Service // as given (shallow: the catalog is not modified), to tell whether the next call's is the same
	noGateway error
	clusters  []*cluster.Cluster
	endpoints []*endpoint.ClusterLoadAssignment
	tcp       map[uint32]*listener.Listener
	vhosts    map[uint32][]*route.VirtualHost
	transcode map[uint32]bool // ports whose virtual hosts turn the JSON transcoder on
}

// Translate is the package's Translate, reusing what an unchanged service translated to last time.
func (t *Translator) Translate(cat *catalog.Catalog, opts Options) (*Resources, error) {
	if _, err := netip.ParseAddr(opts.ListenAddress); err != nil {
		return nil, fmt.Errorf("listen address %q: %v", opts.ListenAddress, err)
	}
	peerHeaders, err := peerMetadataHeaders(opts.PeerMetadata)
	if err != nil {
		return nil, err
	}
	if t.services == nil || !reflect.DeepEqual(t.opts, opts) {
		t.opts, t.services, t.last, t.outs = opts, map[string]*translated{}, nil, nil
	}
	res := &Resources{}
	services := placeable(cat, res)
	invalid := slices.Clone(res.Skipped)
	gateways := map[string]Gateway{}
	for _, g := range opts.Gateways {
		gateways[g.Name] = g
	}
	type httpPort struct {
		port      uint32
		hosts     []*route.VirtualHost
		rbac      bool
		transcode bool
	}
	httpPorts := map[uint32]*httpPort{}
	tcpPorts := map[uint32]*listener.Listener{}
	httpUsed, tcpOwner := map[uint32]bool{}, map[uint32]string{}
	next := make(map[string]*translated, len(services))
	outs := make([]*translated, len(services))
	var todo []int
	for i := range services {
		svc := &services[i]
		var out *translated
		if i < len(t.outs) && t.hosts[i] == svc.Host {
			out = t.outs[i] // the host in its last place: no lookup for each of 10,000
		} else {
			out = t.services[svc.Host]
		}
		if out != nil && (sameLists(&out.svc, svc) || out.svc.Equal(svc)) {
			outs[i] = out
			continue
		}
		todo = append(todo, i)
	}
	common := newCommonParts(opts, gateways)
	var packers []*packer // one per worker
	var mu sync.Mutex
	parallelWorkers(len(todo), func(w, workers int) {
		pk := newPacker(packedSets{common.packed})
		mu.Lock()
		packers = append(packers, pk)
		mu.Unlock()
		for j := w; j < len(todo); j += workers {
			i := todo[j]
			outs[i] = translateService(&services[i], opts, gateways, common, pk)
			if old := t.services[services[i].Host]; old != nil {
				outs[i].keepEqual(old)
			}
		}
	})
	packed := packedSets{common.packed}
	for _, pk := range packers {
		packed = append(packed, pk.packed())
	}
	if patched := t.patch(services, invalid, outs, todo); patched != nil {
		patched.packed = packed
		return patched, nil
	}
	serial := newPacker(packed)
	res.packed = append(packed, serial.packed())
	defer func() {
		t.hosts, t.invalid, t.outs = t.hosts[:0], invalid, outs
		for i := range services {
			t.hosts = append(t.hosts, services[i].Host)
		}
		t.last = res.clone()
	}()
	for i := range services {
		svc, out := &services[i], outs[i]
		next[svc.Host] = out
		if out.noGateway != nil {
			res.skip(svc.Host, SkipNoGatewayAddress, out.noGateway.Error())
			continue
		}
		if err := portConflict(svc, httpUsed, tcpOwner); err != nil {
			res.skip(svc.Host, SkipConflict, err.Error())
			continue
		}
		res.Clusters = append(res.Clusters, out.clusters...)
		res.Endpoints = append(res.Endpoints, out.endpoints...)
		for _, p := range svc.Ports {
			if !p.Protocol.IsHTTP() {
				tcpPorts[p.Number] = out.tcp[p.Number]
				tcpOwner[p.Number] = svc.Host
				continue
			}
			httpUsed[p.Number] = true
			hp := httpPorts[p.Number]
			if hp == nil {
				hp = &httpPort{port: p.Number}
				httpPorts[p.Number] = hp
			}
			hp.hosts = append(hp.hosts, out.vhosts[p.Number]...)
			hp.transcode = hp.transcode || out.transcode[p.Number]
			hp.rbac = hp.rbac || len(svc.AllowedClients) > 0
		}
	}
	t.services = next
	for _, hp := range httpPorts {
		slices.SortFunc(hp.hosts, func(a, b *route.VirtualHost) int { return strings.Compare(a.Name, b.Name) })
		res.Routes = append(res.Routes, routeConfiguration(hp.port, hp.hosts, peerHeaders))
		l := httpListener(hp.port, hp.rbac, hp.transcode, opts, serial)
		limitConnections(l, opts.Limits, serial)
		res.Listeners = append(res.Listeners, l)
	}
	for _, l := range tcpPorts {
		res.Listeners = append(res.Listeners, l)
	}
	translateInbound(opts.Reverse, opts, res)
	concurrently(func() {
		slices.SortFunc(res.Listeners, func(a, b *listener.Listener) int { return strings.Compare(a.Name, b.Name) })
		slices.SortFunc(res.Routes, func(a, b *route.RouteConfiguration) int { return strings.Compare(a.Name, b.Name) })
		res.sortSkipped()
	}, func() {
		slices.SortFunc(res.Clusters, func(a, b *cluster.Cluster) int { return strings.Compare(a.Name, b.Name) })
	}, func() {
		slices.SortFunc(res.Endpoints, func(a, b *endpoint.ClusterLoadAssignment) int { return strings.Compare(a.ClusterName, b.ClusterName) })
	})
	return res, nil
}

// concurrently runs each of fs in a goroutine of its own and waits for them all.
func concurrently(fs ...func()) {
	var wg sync.WaitGroup
	for _, f := range fs {
		wg.Go(f)
	}
	wg.Wait()
}

func routeConfiguration(port uint32, hosts []*route.VirtualHost, peerHeaders []*core.HeaderValueOption) *route.RouteConfiguration {
	rc := &route.RouteConfiguration{
		Name:                RouteName(port),
		VirtualHosts:        hosts,
		ValidateClusters:    wrapperspb.Bool(false),
		InternalOnlyHeaders: slices.Clone(InternalOnlyHeaders),
	}
	if peerHeaders != nil {
		for _, h := range peerHeaders {
			rc.RequestHeadersToAdd = append(rc.RequestHeadersToAdd, proto.Clone(h).(*core.HeaderValueOption))
		}
		// The sidecar answers with its own peer metadata; it is not the VM's business.
		rc.ResponseHeadersToRemove = []string{HeaderPeerMetadataID, HeaderPeerMetadata}
	}
	return rc
}

// keepEqual puts back the objects of old, the same service's last translation, that have the
// same content as their new translation: a change to one of a service's resources (its identity
// is in its clusters only) must not make the others, or the route configuration holding its
// virtual host, new objects to marshal, validate and send again.
func (out *translated) keepEqual(old *translated) {
	if out.noGateway != nil || old.noGateway != nil {
		return
	}
	for i, c := range out.clusters {
		if i < len(old.clusters) && proto.Equal(c, old.clusters[i]) {
			out.clusters[i] = old.clusters[i]
		}
	}
	for i, e := range out.endpoints {
		if i < len(old.endpoints) && proto.Equal(e, old.endpoints[i]) {
			out.endpoints[i] = old.endpoints[i]
		}
	}
	for port, l := range out.tcp {
		if o := old.tcp[port]; o != nil && proto.Equal(l, o) {
			out.tcp[port] = o
		}
	}
	for port, vhs := range out.vhosts {
		o := old.vhosts[port]
		for i, vh := range vhs {
			if i < len(o) && proto.Equal(vh, o[i]) {
				vhs[i] = o[i]
			}
		}
	}
}

// patch is the last result with the resources of the changed services (outs[i] for i in changed)
// put in place of their old ones, or nil when that would not be what a whole translation gives:
// when a service came or went, was or is skipped, or a changed service's resources have other
// names or ports (which decide the listeners' order, conflicts and RBAC). Then sorting is not
// needed (the names are the ones sorted last time), and a change costs what it changes.
func (t *Translator) patch(services []catalog.Service, invalid []SkippedService, outs []*translated, changed []int) *Resources {
	if t.last == nil || len(services) != len(t.hosts) || !slices.Equal(invalid, t.invalid) || len(changed) > len(services)/4 {
		return nil
	}
	for i := range services {
		if services[i].Host != t.hosts[i] {
			return nil
		}
	}
	for _, i := range changed {
		if !sameShape(t.services[services[i].Host], outs[i]) {
			return nil
		}
	}
	for _, sk := range t.last.Skipped {
		if sk.Reason != SkipInvalid {
			for _, i := range changed {
				if services[i].Host == sk.Host {
					return nil
				}
			}
		}
	}
	last := t.last                          // sorted by name, as Translate returns them; its lists are the translator's own
	var puts []func()                       // the changes to last, made once all are known to fit
	hosts := map[int][]*route.VirtualHost{} // route configurations with a changed virtual host
	missing := false                        // a name not in the last result: not for patching
	at := func(i int, ok bool) int {
		missing = missing || !ok
		return i
	}
	for _, i := range changed {
		svc, out := &services[i], outs[i]
		for _, c := range out.clusters {
			k := at(byName(last.Clusters, c.Name, (*cluster.Cluster).GetName))
			puts = append(puts, func() { last.Clusters[k] = c })
		}
		for _, e := range out.endpoints {
			k := at(byName(last.Endpoints, e.ClusterName, (*endpoint.ClusterLoadAssignment).GetClusterName))
			puts = append(puts, func() { last.Endpoints[k] = e })
		}
		for _, l := range out.tcp {
			k := at(byName(last.Listeners, l.Name, (*listener.Listener).GetName))
			puts = append(puts, func() { last.Listeners[k] = l })
		}
		for port, vhs := range out.vhosts {
			r := at(byName(last.Routes, RouteName(port), (*route.RouteConfiguration).GetName))
			old := t.services[svc.Host].vhosts[port]
			for k, vh := range vhs {
				if vh == old[k] || missing {
					continue
				}
				if hosts[r] == nil {
					hosts[r] = slices.Clone(last.Routes[r].VirtualHosts)
				}
				if k := at(byName(last.Routes[r].VirtualHosts, vh.Name, (*route.VirtualHost).GetName)); !missing {
					hosts[r][k] = vh
				}
			}
		}
		if missing {
			return nil
		}
	}
	for _, i := range changed {
		t.services[services[i].Host] = outs[i]
		t.outs[i] = outs[i]
	}
	peerHeaders, _ := peerMetadataHeaders(t.opts.PeerMetadata) // valid: the whole translation took them
	for _, put := range puts {
		put()
	}
	for r, vhs := range hosts {
		port, _ := strconv.Atoi(last.Routes[r].Name)
		last.Routes[r] = routeConfiguration(uint32(port), vhs, peerHeaders)
	}
	return last.clone() // the caller's own lists: t.last stays as returned, whatever it does
}

func (r *Resources) clone() *Resources {
	return &Resources{
		Listeners: slices.Clone(r.Listeners), Routes: slices.Clone(r.Routes),
		Clusters: slices.Clone(r.Clusters), Endpoints: slices.Clone(r.Endpoints), Skipped: slices.Clone(r.Skipped),
	}
}

// sameShape says whether a service's new translation has the resource names, ports and
// policies of its old one (see patch).
func sameShape(old, out *translated) bool {
	if old == nil || old.noGateway != nil || out.noGateway != nil || !slices.Equal(old.svc.Ports, out.svc.Ports) ||
		(len(old.svc.AllowedClients) > 0) != (len(out.svc.AllowedClients) > 0) || !maps.Equal(old.transcode, out.transcode) {
		return false
	}
	if !slices.EqualFunc(old.clusters, out.clusters, func(a, b *cluster.Cluster) bool { return a.Name == b.Name }) ||
		!slices.EqualFunc(old.endpoints, out.endpoints, func(a, b *endpoint.ClusterLoadAssignment) bool { return a.ClusterName == b.ClusterName }) ||
		len(old.tcp) != len(out.tcp) || len(old.vhosts) != len(out.vhosts) {
		return false
	}
	for port, l := range out.tcp {
		if o := old.tcp[port]; o == nil || o.Name != l.Name {
			return false
		}
	}
	for port, vhs := range out.vhosts {
		if !slices.EqualFunc(old.vhosts[port], vhs, func(a, b *route.VirtualHost) bool { return a.Name == b.Name }) {
			return false
		}
	}
	return true
}

// byName finds name in items, sorted by name: a patch's positions in the last result, without
// an index of every resource to build after each whole translation.
func byName[T any](items []T, name string, nameOf func(T) string) (int, bool) {
	return slices.BinarySearchFunc(items, name, func(x T, n string) int { return strings.Compare(nameOf(x), n) })
}

// parallelWorkers runs f(w, workers) for w in 0..workers-1 at once, workers being up to one per
// core, fewer for small n (under 64 items a goroutine is not worth starting).
func parallelWorkers(n int, f func(w, workers int)) {
	workers := min(runtime.GOMAXPROCS(0), max(1, n/64))
	if workers == 1 {
		f(0, 1)
		return
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(w, workers)
		}()
	}
	wg.Wait()
}

// translateService builds one service's clusters, endpoints, TCP listeners and virtual hosts.
// It depends on the service and the options alone, which is what lets a Translator reuse it.
func translateService(svc *catalog.Service, opts Options, gateways map[string]Gateway, common *commonParts, pk *packer) *translated {
	out := &translated{svc: *svc}
	lbEndpoints, err := common.allEndpoints, common.noGateway
	if len(svc.Gateways) > 0 {
		var eps []*endpoint.LbEndpoint
		if eps, err = serviceEndpoints(svc, opts.Gateways, gateways); err == nil {
			lbEndpoints = byPriority(eps, gateways)
		}
	}
	if err != nil {
		out.noGateway = err
		return out
	}
	for _, p := range svc.Ports {
		subsets := []string{""}
		if p.Protocol.IsHTTP() {
			for _, s := range svc.Subsets {
				subsets = append(subsets, s.Name)
			}
		}
		for _, subset := range subsets {
			name := ClusterName(p.Number, subset, svc.Host)
			out.clusters = append(out.clusters, buildCluster(name, svc, p, subset, common, pk))
			out.endpoints = append(out.endpoints, &endpoint.ClusterLoadAssignment{
				ClusterName: name,
				Endpoints:   lbEndpoints,
			})
		}
		if !p.Protocol.IsHTTP() {
			if out.tcp == nil {
				out.tcp = map[uint32]*listener.Listener{}
			}
			l := tcpListener(svc, p, opts, common, pk)
			limitConnections(l, opts.Limits, pk)
			out.tcp[p.Number] = l
			continue
		}
		if out.vhosts == nil {
			out.vhosts, out.transcode = map[uint32][]*route.VirtualHost{}, map[uint32]bool{}
		}
		vhs := virtualHosts(svc, p, common, pk)
		for _, v := range vhs {
			out.transcode[p.Number] = transcodeVirtualHost(v, svc, p, pk) || out.transcode[p.Number]
		}
		out.vhosts[p.Number] = vhs
	}
	return out
}

// serviceEndpoints lists the gateway endpoints that reach svc: its named gateways, or all. A
// named gateway missing from the options has no known address (the catalog's rules refuse
// unknown names): the service goes through its other gateways, or is left out if none has one.
func serviceEndpoints(svc *catalog.Service, all []Gateway, byName map[string]Gateway) ([]*endpoint.LbEndpoint, error) {
	var gws []Gateway
	if len(svc.Gateways) == 0 {
		gws = all
	} else {
		for _, name := range svc.Gateways {
			if g, ok := byName[name]; ok {
				gws = append(gws, g)
			}
		}
	}
	var eps []*endpoint.LbEndpoint
	for _, g := range gws {
		for _, ap := range g.Addresses {
			eps = append(eps, &endpoint.LbEndpoint{
				HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
					Address:  socketAddress(ap.Addr().String(), uint32(ap.Port())),
					Hostname: g.Name,
				}},
			})
		}
	}
	if len(eps) == 0 {
		if len(svc.Gateways) == 0 {
			return nil, errors.New("no gateway address is known yet")
		}
		return nil, fmt.Errorf("none of its gateways (%s) has a known address yet; it is served once one resolves", quoteAll(svc.Gateways))
	}
	slices.SortFunc(eps, func(a, b *endpoint.LbEndpoint) int {
		sa, sb := a.GetEndpoint().GetAddress().GetSocketAddress(), b.GetEndpoint().GetAddress().GetSocketAddress()
		if c := strings.Compare(sa.GetAddress(), sb.GetAddress()); c != 0 {
			return c
		}
		return int(sa.GetPortValue()) - int(sb.GetPortValue())
	})
	return eps, nil
}

func socketAddress(addr string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address: addr, PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

// ADSConfigSource points a resource at the ADS stream.
func ADSConfigSource() *core.ConfigSource {
	return &core.ConfigSource{
		ResourceApiVersion:    core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	}
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // only for messages of linked-in types, which always marshal
	}
	return a
}

// maxCircuit lifts Envoy's default circuit-breaker limits (1024), which a shared appliance would
// hit under normal load; Istio's sidecars do the same.
const maxCircuit = 4294967295

// commonParts are the messages every cluster, listener or route of one translation has alike.
// Resources share them rather than each holding a copy: at 10,000 services copies were a large
// part of a build's allocations, of its marshaling (each packed Any) and of its validation. Shared
// messages are never modified (nor is anything served, see Translator).
type commonParts struct {
	ads             *core.ConfigSource
	tlsParams       *tlsv3.TlsParameters
	certSDS         []*tlsv3.SdsSecretConfig // not appended to: its one element is what is shared
	rootsSDS        *tlsv3.SdsSecretConfig
	eds             *cluster.Cluster_EdsClusterConfig
	connectTimeout  *durationpb.Duration
	circuitBreakers *cluster.CircuitBreakers
	outlier         *cluster.OutlierDetection
	http1, http2    *anypb.Any // upstream HttpProtocolOptions
	accessLogs      []*accesslog.AccessLog
	noTimeout       *durationpb.Duration
	retry           *route.RetryPolicy
	prefixAll       *route.RouteMatch
	packed          packedSet // the Anys above, packed valid
	// allEndpoints reach a service through every gateway (a service that names none): the
	// endpoints of most clusters. noGateway is why there are none.
	allEndpoints []*endpoint.LocalityLbEndpoints
	noGateway    error
}

func newCommonParts(opts Options, gateways map[string]Gateway) *commonParts {
	ads := ADSConfigSource()
	pk := newPacker(nil)
	explicit := func(c *upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig) *anypb.Any {
		return pk.pack(&upstreamhttp.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: c}})
	}
	common := &commonParts{
		ads:            ads,
		tlsParams:      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
		certSDS:        []*tlsv3.SdsSecretConfig{{Name: SecretCertificate, SdsConfig: ads}},
		rootsSDS:       &tlsv3.SdsSecretConfig{Name: SecretRoots, SdsConfig: ads},
		eds:            &cluster.Cluster_EdsClusterConfig{EdsConfig: ads},
		connectTimeout: durationpb.New(opts.ConnectTimeout),
		circuitBreakers: &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
			MaxConnections:     wrapperspb.UInt32(maxCircuit),
			MaxPendingRequests: wrapperspb.UInt32(maxCircuit),
			MaxRequests:        wrapperspb.UInt32(maxCircuit),
			MaxRetries:         wrapperspb.UInt32(maxCircuit),
		}}},
		outlier: &cluster.OutlierDetection{
			Consecutive_5Xx:                    wrapperspb.UInt32(opts.Outlier.ConsecutiveErrors),
			ConsecutiveGatewayFailure:          wrapperspb.UInt32(opts.Outlier.ConsecutiveErrors),
			EnforcingConsecutiveGatewayFailure: wrapperspb.UInt32(100),
			Interval:                           durationpb.New(opts.Outlier.Interval),
			BaseEjectionTime:                   durationpb.New(opts.Outlier.BaseEjectionTime),
			MaxEjectionPercent:                 wrapperspb.UInt32(opts.Outlier.MaxEjectionPercent),
		},
		http1: explicit(&upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &core.Http1ProtocolOptions{}},
		}),
		http2: explicit(&upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
		}),
		accessLogs: accessLogs(opts.AccessLog, pk),
		noTimeout:  durationpb.New(0),
		retry:      connectRetry(pk),
		prefixAll:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
		packed:     pk.packed(),
	}
	eps, err := serviceEndpoints(&catalog.Service{}, opts.Gateways, gateways)
	if err != nil {
		common.noGateway = err
	} else {
		common.allEndpoints = byPriority(eps, gateways)
	}
	return common
}

func buildCluster(name string, svc *catalog.Service, p catalog.Port, subset string, common *commonParts, pk *packer) *cluster.Cluster {
	sans := make([]*tlsv3.SubjectAltNameMatcher, 0, len(svc.Identities))
	for _, id := range svc.Identities {
		sans = append(sans, &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: id}},
		})
	}
	tlsCtx := &tlsv3.UpstreamTlsContext{
		Sni: SNI(p.Number, subset, svc.Host),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams:                      common.tlsParams,
			AlpnProtocols:                  ALPN(p.Protocol),
			TlsCertificateSdsSecretConfigs: common.certSDS,
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
				CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
					DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: sans},
					ValidationContextSdsSecretConfig: common.rootsSDS,
				},
			},
		},
	}
	c := &cluster.Cluster{
		Name:                 name,
		AltStatName:          ClusterStatName(name),
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig:     common.eds,
		ConnectTimeout:       common.connectTimeout,
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
		CircuitBreakers:      common.circuitBreakers,
		OutlierDetection:     common.outlier,
		TransportSocket: &core.TransportSocket{
			Name:       wellknown.TransportSocketTLS,
			ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: pk.pack(tlsCtx)},
		},
	}
	if p.Protocol.IsHTTP() {
		hpo := common.http1
		if p.Protocol.UsesHTTP2Upstream() {
			hpo = common.http2
		}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{HTTPProtocolOptionsKey: hpo}
	}
	return c
}

// HTTPProtocolOptionsKey is the extension name Envoy reads upstream HTTP options from.
const HTTPProtocolOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

// RBAC filter names.
const (
	HTTPRBACFilter    = "envoy.filters.http.rbac"
	NetworkRBACFilter = "envoy.filters.network.rbac"
)

// allowClients is an RBAC policy that allows only connections whose peer address (not a header
// the client could forge) is in cidrs.
func allowClients(cidrs []string) *rbacconfig.RBAC {
	principals := make([]*rbacconfig.Principal, 0, len(cidrs))
	for _, c := range cidrs {
		pfx := netip.MustParsePrefix(c)
		principals = append(principals, &rbacconfig.Principal{Identifier: &rbacconfig.Principal_DirectRemoteIp{
			DirectRemoteIp: &core.CidrRange{AddressPrefix: pfx.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(pfx.Bits()))},
		}})
	}
	return &rbacconfig.RBAC{
		Action: rbacconfig.RBAC_ALLOW,
		Policies: map[string]*rbacconfig.Policy{"allowed-clients": {
			Permissions: []*rbacconfig.Permission{{Rule: &rbacconfig.Permission_Any{Any: true}}},
			Principals:  principals,
		}},
	}
}

func accessLogs(enabled bool, pk *packer) []*accesslog.AccessLog {
	if !enabled {
		return nil
	}
	return []*accesslog.AccessLog{{
		Name:       "envoy.access_loggers.stdout",
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: pk.pack(&streamlog.StdoutAccessLog{})},
	}}
}

func tcpListener(svc *catalog.Service, p catalog.Port, opts Options, common *commonParts, pk *packer) *listener.Listener {
	name := ListenerName(opts.ListenAddress, p.Number)
	chain := &listener.FilterChain{Filters: []*listener.Filter{{
		Name: wellknown.TCPProxy,
		ConfigType: &listener.Filter_TypedConfig{TypedConfig: pk.pack(&tcpproxy.TcpProxy{
			StatPrefix:       StatPrefix(p.Number),
			ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: ClusterName(p.Number, "", svc.Host)},
			// A gateway that refuses the connection is not the end: try another (the built-in
			// data plane does the same).
			MaxConnectAttempts: wrapperspb.UInt32(2),
			AccessLog:          common.accessLogs,
		})},
	}}}
	if len(svc.AllowedClients) > 0 {
		// Allowed clients are matched by the filter chain itself, on the connection's source
		// address: a client outside them matches no chain and is closed at once. A network RBAC
		// filter would decide only on the client's first byte, after tcp_proxy has already
		// connected upstream, so a server-first protocol (MySQL) would greet a refused client.
		chain.FilterChainMatch = &listener.FilterChainMatch{SourcePrefixRanges: cidrRanges(svc.AllowedClients)}
	}
	return &listener.Listener{
		Name:         name,
		Address:      socketAddress(opts.ListenAddress, p.Number),
		FilterChains: []*listener.FilterChain{chain},
	}
}

// cidrRanges are Envoy's CidrRanges for catalog CIDRs (validated: no host bits).
func cidrRanges(cidrs []string) []*core.CidrRange {
	out := make([]*core.CidrRange, 0, len(cidrs))
	for _, c := range cidrs {
		pfx := netip.MustParsePrefix(c)
		out = append(out, &core.CidrRange{AddressPrefix: pfx.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(pfx.Bits()))})
	}
	return out
}

// InternalOnlyHeaders are removed from every request a client sends, besides the x-envoy-*
// headers Envoy itself cleans: Istio's metadata exchange headers, with which a caller tells the
// sidecar which workload it is (for telemetry), so a VM cannot pose as another workload. With
// Options.PeerMetadata the route configurations then add fwdproxy's own.
var InternalOnlyHeaders = []string{HeaderPeerMetadata, HeaderPeerMetadataID}

// noInternalAddresses makes Envoy deem no client internal. Legacy VMs are on private addresses,
// and Envoy trusts those (RFC 1918 and 127.0.0.1) when internal_address_config is unset (before
// Envoy 1.33) or has no cidr_ranges (still in 1.40). So the list names only the unspecified
// addresses, which no TCP peer can have.
func noInternalAddresses() *hcm.HttpConnectionManager_InternalAddressConfig {
	return &hcm.HttpConnectionManager_InternalAddressConfig{CidrRanges: []*core.CidrRange{
		{AddressPrefix: "0.0.0.0", PrefixLen: wrapperspb.UInt32(32)},
		{AddressPrefix: "::", PrefixLen: wrapperspb.UInt32(128)},
	}}
}

func httpListener(port uint32, rbac, transcode bool, opts Options, pk *packer) *listener.Listener {
	name := ListenerName(opts.ListenAddress, port)
	var httpFilters []*hcm.HttpFilter
	if rbac {
		// An empty RBAC config enforces nothing; each virtual host with allowed clients
		// overrides it (RBACPerRoute), since one port serves services with different policies.
		httpFilters = append(httpFilters, &hcm.HttpFilter{
			Name:       HTTPRBACFilter,
			ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: pk.pack(&rbachttp.RBAC{})},
		})
	}
	if transcode {
		// After RBAC: a refused client is refused before its JSON is read.
		httpFilters = append(httpFilters, transcoderHTTPFilter(pk))
	}
	httpFilters = append(httpFilters, &hcm.HttpFilter{
		Name: wellknown.Router,
		// No x-envoy-* headers toward the mesh or back to the VM (upstream service time,
		// expected timeout): fwdproxy is a transparent hop, and the built-in data plane adds none.
		ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: pk.pack(&router.Router{SuppressEnvoyHeaders: true})},
	})
	manager := &hcm.HttpConnectionManager{
		CodecType:  hcm.HttpConnectionManager_AUTO,
		StatPrefix: StatPrefix(port),
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
			ConfigSource: ADSConfigSource(), RouteConfigName: RouteName(port),
		}},
		HttpFilters: httpFilters,
		// The client's address goes to the service in X-Forwarded-For (appended: the last entry
		// is the one to trust) and X-Envoy-External-Address; what the client sent is not trusted.
		UseRemoteAddress: wrapperspb.Bool(true),
		// The service's own Server header reaches the VM; Envoy's local replies carry none.
		ServerHeaderTransformation: hcm.HttpConnectionManager_PASS_THROUGH,
		// Legacy clients still speak HTTP/1.0 (Envoy answers 426 by default); upstream it is 1.1.
		HttpProtocolOptions: &core.Http1ProtocolOptions{AcceptHttp_10: true},
		// No client is internal, so every request is an edge request: Envoy removes the x-envoy-*
		// control headers (retries, timeouts, original path...) and the route configuration's
		// internal_only_headers, and replaces x-request-id.
		InternalAddressConfig: noInternalAddresses(),
		GenerateRequestId:     wrapperspb.Bool(true),
		// SANITIZE is Envoy's default, spelled out: a client's x-forwarded-client-cert never
		// goes on, or the sidecar would append its entry for fwdproxy after one the VM wrote.
		ForwardClientCertDetails:  hcm.HttpConnectionManager_SANITIZE,
		PreserveExternalRequestId: false,
		AccessLog:                 accessLogs(opts.AccessLog, pk),
	}
	requestLimits(manager, opts.Limits)
	return &listener.Listener{
		Name:    name,
		Address: socketAddress(opts.ListenAddress, port),
		FilterChains: []*listener.FilterChain{{Filters: []*listener.Filter{{
			Name:       wellknown.HTTPConnectionManager,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: pk.pack(manager)},
		}}}},
	}
}

// connectRetry retries a request whose connection to a gateway failed, once, on another gateway:
// nothing reached the service, so it is safe for any method. Nothing else is retried (Istio's
// default also retries 503s; fwdproxy leaves that to the client, which sees the service's answer).
func connectRetry(pk *packer) *route.RetryPolicy {
	return &route.RetryPolicy{
		RetryOn:    "connect-failure",
		NumRetries: wrapperspb.UInt32(1),
		RetryHostPredicate: []*route.RetryPolicy_RetryHostPredicate{{
			Name:       "envoy.retry_host_predicates.previous_hosts",
			ConfigType: &route.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: pk.pack(&previoushosts.PreviousHostsPredicate{})},
		}},
		HostSelectionRetryMaxAttempts: 5,
	}
}

// virtualHosts returns the service's virtual host on port p (FQDN, FQDN:port, aliases) and one per
// subset (its hosts), each routing everything to its cluster.
func virtualHosts(svc *catalog.Service, p catalog.Port, common *commonParts, pk *packer) []*route.VirtualHost {
	vh := func(name, subset string, hosts []string) *route.VirtualHost {
		var domains []string
		for _, h := range hosts {
			domains = append(domains, h, h+":"+strconv.Itoa(int(p.Number)))
		}
		v := &route.VirtualHost{
			Name:    name,
			Domains: domains,
			Routes: []*route.Route{{
				Name:  "default",
				Match: common.prefixAll,
				Action: &route.Route_Route{Route: &route.RouteAction{
					ClusterSpecifier: &route.RouteAction_Cluster{Cluster: ClusterName(p.Number, subset, svc.Host)},
					// No overall deadline, as in Istio: long polls and gRPC streams are normal.
					Timeout:     common.noTimeout,
					RetryPolicy: common.retry,
				}},
			}},
		}
		if len(svc.AllowedClients) > 0 {
			v.TypedPerFilterConfig = map[string]*anypb.Any{
				HTTPRBACFilter: pk.pack(&rbachttp.RBACPerRoute{Rbac: &rbachttp.RBAC{Rules: allowClients(svc.AllowedClients)}}),
			}
		}
		return v
	}
	port := ":" + strconv.Itoa(int(p.Number))
	out := []*route.VirtualHost{vh(svc.Host+port, "", append([]string{svc.Host}, svc.Aliases...))}
	for _, s := range svc.Subsets {
		out = append(out, vh(s.Name+"."+svc.Host+port, s.Name, s.Hosts))
	}
	return out
}

// sameLists says whether a and b are one service value: the same host and the very same lists
// (discovery.Merger shares an unchanged service's between its results). Comparing 10,000
// services element by element was most of what a one-service change cost the translator.
func sameLists(a, b *catalog.Service) bool {
	return a.Host == b.Host && sameArray(a.Aliases, b.Aliases) && sameArray(a.Ports, b.Ports) &&
		sameArray(a.Identities, b.Identities) && sameArray(a.Subsets, b.Subsets) &&
		sameArray(a.AllowedClients, b.AllowedClients) && sameArray(a.Gateways, b.Gateways) && a.Transcoding == b.Transcoding
}

// sameArray says whether a and b are the same list: nil, or one array of one length.
func sameArray[T any](a, b []T) bool {
	if len(a) != len(b) || (a == nil) != (b == nil) {
		return false
	}
	return len(a) == 0 || &a[0] == &b[0]
}

package controlplane

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	metricsv3 "github.com/envoyproxy/go-control-plane/envoy/config/metrics/v3"
	overload "github.com/envoyproxy/go-control-plane/envoy/config/overload/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	downstreamconns "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/internal/xdslimit"
)

// Redacted replaces private key bytes in rendered output.
const Redacted = "[redacted]"

// RedactSecrets returns copies of secrets with private keys replaced by Redacted.
func RedactSecrets(secrets []*tlsv3.Secret) []*tlsv3.Secret {
	out := make([]*tlsv3.Secret, 0, len(secrets))
	for _, s := range secrets {
		c := proto.Clone(s).(*tlsv3.Secret)
		if tc := c.GetTlsCertificate(); tc != nil && tc.PrivateKey != nil {
			tc.PrivateKey = &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: Redacted}}
		}
		out = append(out, c)
	}
	return out
}

// MarshalJSON renders proto messages as stable, indented Envoy proto-JSON (protojson output is
// deliberately unstable in whitespace, so it is re-indented).
func MarshalJSON(v proto.Message) (json.RawMessage, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(v)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// RenderJSON renders resources and secrets as one JSON object with keys listeners, routes,
// clusters, endpoints and secrets, each a list of Envoy proto-JSON. Private keys are redacted.
func RenderJSON(res *Resources, secrets []*tlsv3.Secret) ([]byte, error) {
	out := map[string][]json.RawMessage{"listeners": {}, "routes": {}, "clusters": {}, "endpoints": {}, "secrets": {}}
	add := func(key string, m proto.Message) error {
		j, err := MarshalJSON(m)
		if err != nil {
			return err
		}
		out[key] = append(out[key], j)
		return nil
	}
	for _, l := range res.Listeners {
		if err := add("listeners", l); err != nil {
			return nil, err
		}
	}
	for _, r := range res.Routes {
		if err := add("routes", r); err != nil {
			return nil, err
		}
	}
	for _, c := range res.Clusters {
		if err := add("clusters", c); err != nil {
			return nil, err
		}
	}
	for _, e := range res.Endpoints {
		if err := add("endpoints", e); err != nil {
			return nil, err
		}
	}
	for _, s := range RedactSecrets(secrets) {
		if err := add("secrets", s); err != nil {
			return nil, err
		}
	}
	return json.MarshalIndent(out, "", "  ")
}

// XDSClusterName is the bootstrap's static cluster for the xDS server.
const XDSClusterName = "xds_cluster"

// BootstrapOptions describe the Envoy instance a bootstrap is for.
type BootstrapOptions struct {
	NodeID, NodeCluster string
	// XDSSocket is the path of the daemon's xDS Unix socket (xds.socket). Envoy reaches it as a
	// pipe address; the daemon admits it by its user or group.
	XDSSocket string
	// AdminAddress is Envoy's admin host:port (keep it on loopback).
	AdminAddress string
	// SotW subscribes with state-of-the-world ADS instead of delta ADS.
	SotW bool
}

// Bootstrap is an Envoy bootstrap that takes everything from the daemon over ADS, on the
// daemon's Unix socket: delta ADS, unless o.SotW.
func Bootstrap(o BootstrapOptions) (*bootstrap.Bootstrap, error) {
	if !filepath.IsAbs(o.XDSSocket) {
		return nil, fmt.Errorf("xds socket %q: need an absolute path", o.XDSSocket)
	}
	admin, err := adminAddress(o.AdminAddress)
	if err != nil {
		return nil, err
	}
	h2 := mustAny(&upstreamhttp.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{
		ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
		},
	}})
	api := core.ApiConfigSource_DELTA_GRPC
	if o.SotW {
		api = core.ApiConfigSource_GRPC
	}
	b := &bootstrap.Bootstrap{
		Node: &core.Node{Id: o.NodeID, Cluster: o.NodeCluster},
		DynamicResources: &bootstrap.Bootstrap_DynamicResources{
			AdsConfig: &core.ApiConfigSource{
				ApiType:             api,
				TransportApiVersion: core.ApiVersion_V3,
				GrpcServices: []*core.GrpcService{{TargetSpecifier: &core.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &core.GrpcService_EnvoyGrpc{
						ClusterName: XDSClusterName,
						// Envoy's own default is no limit; stating the one the control plane
						// builds to keeps Envoy and the built-in data plane on one contract.
						// (The xds cluster's HTTP/2 windows, 16 MiB per stream and 24 MiB per
						// connection by default, only pace a larger message; they cap nothing.)
						MaxReceiveMessageLength: wrapperspb.UInt32(xdslimit.MaxMessageBytes),
					},
				}}},
				SetNodeOnFirstMessageOnly: true,
			},
			LdsConfig: ADSConfigSource(),
			CdsConfig: ADSConfigSource(),
		},
		StaticResources: &bootstrap.Bootstrap_StaticResources{Clusters: []*cluster.Cluster{{
			Name:                          XDSClusterName,
			ClusterDiscoveryType:          &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
			ConnectTimeout:                durationpb.New(time.Second),
			TypedExtensionProtocolOptions: map[string]*anypb.Any{HTTPProtocolOptionsKey: h2},
			LoadAssignment: &endpoint.ClusterLoadAssignment{
				ClusterName: XDSClusterName,
				Endpoints: []*endpoint.LocalityLbEndpoints{{LbEndpoints: []*endpoint.LbEndpoint{{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
					Address: &core.Address{Address: &core.Address_Pipe{Pipe: &core.Pipe{Path: o.XDSSocket}}},
				}}}}}},
			},
		}}},
		Admin:           &bootstrap.Admin{Address: xdsSocket(admin)},
		OverloadManager: overloadManager(),
	}
	leanStats(b)
	if err := ValidateDeep(b); err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	return b, nil
}

// MaxDownstreamConnections bounds the connections Envoy accepts from clients at once. Each can
// hold an upstream connection too, so the bound stays under half the machine image's file limit
// (LimitNOFILE=1048576): past it Envoy refuses new client connections rather than run out of
// descriptors for its xDS stream, upstreams and admin. Envoy warns at startup without a bound.
const MaxDownstreamConnections = 500000

// overloadManager is Envoy's global downstream connection limit.
// leanStats keeps Envoy's statistics from costing in proportion to the catalog. At 10,000
// services Envoy holds 20,000 clusters with about 150 statistics each, and both its periodic
// flush and a Prometheus scrape walk them all on the main thread, which also applies xDS (a
// usedonly scrape took 7 s there, every 15 s):
//   - Envoy flushes only when its stats are asked for (no stats sink here: Prometheus scrapes
//     the admin API), not every 5 s.
//   - A cluster's traffic statistics are created when it first carries traffic.
//   - Of a cluster's statistics Envoy keeps those an operator reads per service (clusterStats):
//     connections, requests by status, latency, membership, ejections, TLS handshakes and
//     their failures, and health checks.
//     Every statistic outside "cluster.", and all of the xDS cluster's, are kept.
func leanStats(b *bootstrap.Bootstrap) {
	b.StatsFlush = &bootstrap.Bootstrap_StatsFlushOnAdmin{StatsFlushOnAdmin: true}
	b.DeferredStatOptions = &bootstrap.Bootstrap_DeferredStatOptions{EnableDeferredCreationStats: true}
	b.StatsConfig = &metricsv3.StatsConfig{StatsMatcher: &metricsv3.StatsMatcher{
		StatsMatcher: &metricsv3.StatsMatcher_InclusionList{InclusionList: &matcher.ListStringMatcher{
			Patterns: []*matcher.StringMatcher{
				regexMatcher(notUnderCluster),
				regexMatcher(`cluster\.` + regexp.QuoteMeta(XDSClusterName) + `\..*`),
				regexMatcher(`cluster\.[^.]+\.(` + strings.Join(clusterStats, "|") + `)`),
			},
		}},
	}}
}

// notUnderCluster matches every statistic name that does not start with "cluster." (RE2 has no
// lookahead): cluster_manager.*, listener.*, http.*, tcp.*, server.* and all others.
const notUnderCluster = `([^c]|c[^l]|cl[^u]|clu[^s]|clus[^t]|clust[^e]|cluste[^r]|cluster[^.]).*`

// clusterStats are the per-cluster statistics Envoy keeps (regular expressions for the part
// after "cluster.NAME."); the dashboard and alerts in deploy/observability read a subset.
var clusterStats = []string{
	`upstream_cx_(total|active|connect_fail|connect_timeout|none_healthy|overflow|destroy_with_active_rq)`,
	`upstream_rq_(total|active|pending_active|pending_overflow|time|timeout|per_try_timeout|retry|retry_success|[1-5]xx|[1-5][0-9][0-9])`,
	`membership_(healthy|degraded|total|change)`,
	`outlier_detection\.ejections_(active|enforced_total|total)`,
	// TLS: handshakes and the ways they fail; not OCSP stapling, certificate hashes or each
	// certificate's expiry (the daemon exports the identity's).
	`ssl\.(handshake|session_reused|connection_error|no_certificate|fail_verify_(san|error|no_cert))`,
	`health_check\..*`,
}

func regexMatcher(re string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: re}}}
}

func overloadManager() *overload.OverloadManager {
	return &overload.OverloadManager{ResourceMonitors: []*overload.ResourceMonitor{{
		Name: "envoy.resource_monitors.global_downstream_max_connections",
		ConfigType: &overload.ResourceMonitor_TypedConfig{TypedConfig: mustAny(&downstreamconns.DownstreamConnectionsConfig{
			MaxActiveDownstreamConnections: MaxDownstreamConnections,
		})},
	}}}
}

type hp struct {
	host string
	port uint32
}

// adminAddress is Envoy's admin host:port, which Envoy binds without resolving names: the host
// must be an IP address (empty means 127.0.0.1).
func adminAddress(s string) (hp, error) {
	a, err := hostPort(s)
	if err != nil {
		return hp{}, fmt.Errorf("envoy admin address: %w", err)
	}
	if _, err := netip.ParseAddr(a.host); err != nil {
		return hp{}, fmt.Errorf("envoy admin address %q: Envoy needs an IP address there, not a host name", s)
	}
	return a, nil
}

func hostPort(s string) (hp, error) {
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return hp{}, err
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 1 || n > 65535 {
		return hp{}, fmt.Errorf("invalid port in %q", s)
	}
	if h == "" {
		h = "127.0.0.1"
	}
	return hp{h, uint32(n)}, nil
}

func xdsSocket(a hp) *core.Address { return socketAddress(a.host, a.port) }

func lbEndpoint(a hp) *endpoint.LbEndpoint {
	return &endpoint.LbEndpoint{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: socketAddress(a.host, a.port)}}}
}

// StaticGateway is a gateway for a static config: its address may be a DNS name, which Envoy
// re-resolves itself (STRICT_DNS).
type StaticGateway struct {
	Name, Address string
	Port          uint32
}

// StaticOptions describe a self-contained Envoy config with no control plane.
type StaticOptions struct {
	AdminAddress string
	Gateways     []StaticGateway
	// SDSDir holds default.json and ROOTCA.json (see StaticSecrets), watched by Envoy.
	SDSDir string
}

// StaticBootstrap turns translated resources into one static Envoy config: routes inlined into
// their listeners, clusters resolving the gateways by DNS, and secrets read from SDS files so the
// key never appears in the config and rotates by replacing files.
func StaticBootstrap(res *Resources, o StaticOptions, nodeID, nodeCluster string) (*bootstrap.Bootstrap, error) {
	admin, err := adminAddress(o.AdminAddress)
	if err != nil {
		return nil, err
	}
	routes := map[string]*route.RouteConfiguration{}
	for _, r := range res.Routes {
		routes[r.Name] = r
	}
	gateways := map[string]StaticGateway{}
	for _, g := range o.Gateways {
		gateways[g.Name] = g
	}
	endpoints := map[string]*endpoint.ClusterLoadAssignment{}
	for _, e := range res.Endpoints {
		endpoints[e.ClusterName] = e
	}
	sds := func(name string) *tlsv3.SdsSecretConfig {
		return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: &core.ConfigSource{
			ResourceApiVersion: core.ApiVersion_V3,
			ConfigSourceSpecifier: &core.ConfigSource_PathConfigSource{PathConfigSource: &core.PathConfigSource{
				Path:             o.SDSDir + "/" + name + ".json",
				WatchedDirectory: &core.WatchedDirectory{Path: o.SDSDir},
			}},
		}}
	}
	static := &bootstrap.Bootstrap_StaticResources{}
	for _, l := range res.Listeners {
		l = proto.Clone(l).(*listener.Listener)
		for _, fc := range l.FilterChains {
			for _, f := range fc.Filters {
				m := &hcm.HttpConnectionManager{}
				if f.GetTypedConfig().MessageIs(m) {
					if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
						return nil, err
					}
					if m.GetRouteConfig() != nil {
						continue // inline already (the inbound listener's chains)
					}
					rc := routes[m.GetRds().GetRouteConfigName()]
					if rc == nil {
						return nil, fmt.Errorf("listener %s: route %q missing", l.Name, m.GetRds().GetRouteConfigName())
					}
					m.RouteSpecifier = &hcm.HttpConnectionManager_RouteConfig{RouteConfig: rc}
					f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: mustAny(m)}
				}
			}
		}
		if err := staticDownstreamSecrets(l, sds); err != nil {
			return nil, err
		}
		static.Listeners = append(static.Listeners, l)
	}
	for _, c := range res.Clusters {
		c = proto.Clone(c).(*cluster.Cluster)
		if c.GetType() != cluster.Cluster_EDS {
			static.Clusters = append(static.Clusters, c) // the reverse direction's VM clusters
			continue
		}
		c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_STRICT_DNS}
		c.EdsClusterConfig = nil
		cla := &endpoint.ClusterLoadAssignment{ClusterName: c.Name}
		var eps []*endpoint.LbEndpoint
		for _, ep := range endpoints[c.Name].GetEndpoints() {
			for _, lb := range ep.LbEndpoints {
				name := lb.GetEndpoint().GetHostname()
				g, ok := gateways[name]
				if !ok {
					return nil, fmt.Errorf("cluster %s: gateway %q has no static address", c.Name, name)
				}
				e := lbEndpoint(hp{g.Address, g.Port})
				e.GetEndpoint().Hostname = g.Name
				if !containsEndpoint(eps, e) {
					eps = append(eps, e)
				}
			}
		}
		cla.Endpoints = []*endpoint.LocalityLbEndpoints{{LbEndpoints: eps}}
		c.LoadAssignment = cla
		tlsCtx := &tlsv3.UpstreamTlsContext{}
		if err := c.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
			return nil, err
		}
		ctx := tlsCtx.CommonTlsContext
		ctx.TlsCertificateSdsSecretConfigs = []*tlsv3.SdsSecretConfig{sds(SecretCertificate)}
		ctx.GetCombinedValidationContext().ValidationContextSdsSecretConfig = sds(SecretRoots)
		c.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: mustAny(tlsCtx)}
		static.Clusters = append(static.Clusters, c)
	}
	b := &bootstrap.Bootstrap{
		Node:            &core.Node{Id: nodeID, Cluster: nodeCluster},
		StaticResources: static,
		Admin:           &bootstrap.Admin{Address: xdsSocket(admin)},
		OverloadManager: overloadManager(),
	}
	leanStats(b)
	if err := ValidateDeep(b); err != nil {
		return nil, fmt.Errorf("static config: %w", err)
	}
	return b, nil
}

// staticDownstreamSecrets points the inbound listener's downstream TLS at the SDS files.
func staticDownstreamSecrets(l *listener.Listener, sds func(string) *tlsv3.SdsSecretConfig) error {
	for _, fc := range l.FilterChains {
		if fc.GetTransportSocket() == nil {
			continue
		}
		tlsCtx := &tlsv3.DownstreamTlsContext{}
		if err := fc.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
			return fmt.Errorf("listener %s: %w", l.Name, err)
		}
		ctx := tlsCtx.CommonTlsContext
		ctx.TlsCertificateSdsSecretConfigs = []*tlsv3.SdsSecretConfig{sds(SecretCertificate)}
		if cv := ctx.GetCombinedValidationContext(); cv != nil {
			cv.ValidationContextSdsSecretConfig = sds(SecretRoots)
		}
		fc.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: mustAny(tlsCtx)}
	}
	return nil
}

func containsEndpoint(list []*endpoint.LbEndpoint, e *endpoint.LbEndpoint) bool {
	for _, x := range list {
		if proto.Equal(x, e) {
			return true
		}
	}
	return false
}

// StaticSecretFiles are the contents of the SDS files StaticBootstrap's config reads from its
// SDSDir, by file name (default.json, ROOTCA.json): each a DiscoveryResponse holding one of
// StaticSecrets, which reference the PEM files by path.
func StaticSecretFiles(certChain, privateKey, roots string) (map[string][]byte, error) {
	out := map[string][]byte{}
	for name, secret := range StaticSecrets(certChain, privateKey, roots) {
		a, err := anypb.New(secret)
		if err != nil {
			return nil, err
		}
		doc, err := MarshalJSON(&discoverypb.DiscoveryResponse{Resources: []*anypb.Any{a}})
		if err != nil {
			return nil, err
		}
		out[name+".json"] = doc
	}
	return out, nil
}

// StaticSecrets are the file-based SDS documents for a static config: each references the PEM
// files by path, so no key material is copied into them.
func StaticSecrets(certChain, privateKey, roots string) map[string]proto.Message {
	file := func(p string) *core.DataSource {
		return &core.DataSource{Specifier: &core.DataSource_Filename{Filename: p}}
	}
	return map[string]proto.Message{
		SecretCertificate: &tlsv3.Secret{Name: SecretCertificate, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: file(certChain), PrivateKey: file(privateKey),
		}}},
		SecretRoots: &tlsv3.Secret{Name: SecretRoots, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: file(roots),
		}}},
	}
}

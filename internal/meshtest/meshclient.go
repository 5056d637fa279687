//go:build linux

package meshtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// EnvoyMeshClientOptions describe a mesh workload's sidecar calling a ServiceEntry host with a
// DestinationRule tls.mode ISTIO_MUTUAL: what istiod builds as the sidecar's outbound cluster
// (buildOutboundCluster with an ISTIO_MUTUAL TLS context), in front of a plain local listener the
// test's application calls.
type EnvoyMeshClientOptions struct {
	// Name of the workload; its identity is SPIFFEID, issued by CA.
	Name, SPIFFEID string
	CA             *CA
	// Listen is the plain address the application calls; Upstream is the fleet's inbound
	// mTLS address (the ServiceEntry endpoint).
	Listen, Upstream string
	// Target is the ServiceEntry host and port (the SNI); Protocol is HTTP or TCP.
	Target   Target
	Protocol string
	// ServerID is the ServiceEntry's subjectAltNames: the fleet's SPIFFE ID.
	ServerID string
}

// StartEnvoyMeshClient runs Envoy as the client side of a sidecar: the workload's certificate
// (leaf + intermediate), the mesh root, SNI outbound_.PORT_._.HOST, Istio's ALPN for the port's
// protocol and a URI SAN check of the server against ServerID.
func StartEnvoyMeshClient(dir string, o EnvoyMeshClientOptions) (*Process, error) {
	if o.CA == nil || o.Listen == "" || o.Upstream == "" || (o.Protocol != HTTP && o.Protocol != TCP) {
		return nil, fmt.Errorf("meshtest: an Envoy mesh client needs CA, Listen, Upstream and an http or tcp Protocol")
	}
	name := "envoy-meshclient-" + o.Name
	if err := writeIdentity(dir, name, o.CA, o.SPIFFEID); err != nil {
		return nil, err
	}
	root := filepath.Join(dir, name+"-root.pem")
	if err := os.WriteFile(root, o.CA.RootPEM, 0o644); err != nil {
		return nil, err
	}
	file := func(p string) *core.DataSource {
		return &core.DataSource{Specifier: &core.DataSource_Filename{Filename: p}}
	}
	tlsCtx := &tlsv3.UpstreamTlsContext{
		Sni: o.Target.SNI(),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams:       &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2, TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3},
			AlpnProtocols:   SidecarClientALPN(o.Protocol),
			TlsCertificates: []*tlsv3.TlsCertificate{{CertificateChain: file(filepath.Join(dir, name+"-chain.pem")), PrivateKey: file(filepath.Join(dir, name+"-key.pem"))}},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: file(root),
				MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
					SanType: tlsv3.SubjectAltNameMatcher_URI,
					Matcher: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: o.ServerID}},
				}},
			}},
		},
	}
	clusterName := "outbound|" + fmt.Sprint(o.Target.Port) + "||" + o.Target.Host
	c, err := staticCluster(clusterName, o.Upstream)
	if err != nil {
		return nil, err
	}
	c.ConnectTimeout = durationpb.New(5 * time.Second)
	tn, ta := typed("envoy.transport_sockets.tls", tlsCtx)
	c.TransportSocket = &core.TransportSocket{Name: tn, ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: ta}}
	la, err := socketAddress(o.Listen)
	if err != nil {
		return nil, err
	}
	var filter *listener.Filter
	if o.Protocol == HTTP {
		_, opts := typed("", &upstreamhttp.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{}},
		}})
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts}
		rn, ra := typed("envoy.filters.http.router", &router.Router{})
		filter = networkFilter("envoy.filters.network.http_connection_manager", &hcm.HttpConnectionManager{
			StatPrefix: "outbound_" + strings.ReplaceAll(o.Target.Host, ".", "_"),
			RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
				Name: "outbound",
				VirtualHosts: []*route.VirtualHost{{Name: "all", Domains: []string{"*"}, Routes: []*route.Route{{
					Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
					Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName}}},
				}}}},
			}},
			HttpFilters: []*hcm.HttpFilter{{Name: rn, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: ra}}},
		})
	} else {
		filter = networkFilter("envoy.filters.network.tcp_proxy", &tcpproxy.TcpProxy{
			StatPrefix:       "outbound_tcp",
			ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: clusterName},
		})
	}
	l := &listener.Listener{Name: "outbound", Address: la, FilterChains: []*listener.FilterChain{{Filters: []*listener.Filter{filter}}}}
	admin, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	b, err := envoyBootstrap(admin, []*listener.Listener{l}, []*cluster.Cluster{c})
	if err != nil {
		return nil, err
	}
	return envoyProcess(name, dir, o.Listen, admin, b)
}

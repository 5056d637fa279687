package controlplane

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
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
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// The reverse direction: mesh workloads call services on legacy VMs through the fleet. One
// listener terminates Istio mTLS as a sidecar's STRICT inbound side does (the fleet's "default"
// certificate, the caller's certificate required and verified against ROOTCA, its URI SAN in the
// mesh's trust domain), with one filter chain per VM service port chosen by the SNI a sidecar
// sends for an ISTIO_MUTUAL destination (outbound_.PORT_._.HOST). The caller's principal is
// checked by RBAC (HTTP: 403, TCP: the connection closed) and the call goes on in plain HTTP or
// TCP to the VMs, round robin over those that pass their health checks and are not ejected.

// Reverse is the translation input of the reverse direction.
type Reverse struct {
	// Address and Port of the inbound mTLS listener.
	Address string
	Port    uint32
	// TrustDomain of the callers: a client certificate's URI SAN must start spiffe://TD/.
	TrustDomain    string
	ConnectTimeout time.Duration
	HealthCheck    HealthCheck
	Outlier        Outlier
	Services       []ReverseService
}

// HealthCheck is the active health check of VM backends.
type HealthCheck struct {
	Interval, Timeout                    time.Duration
	UnhealthyThreshold, HealthyThreshold uint32
}

// ReverseService is one service on legacy VMs.
type ReverseService struct {
	Host    string
	Aliases []string
	Ports   []ReversePort
	// Backends are IP addresses or DNS names with an optional port (0: the target port).
	Backends []Backend
	// Principals are the SPIFFE IDs allowed to call; none refuses every caller.
	Principals []string
}

// Backend is one VM.
type Backend struct {
	Host string
	Port uint32
}

// ReversePort is one port of a VM service.
type ReversePort struct {
	Number, TargetPort uint32
	Protocol           catalog.Protocol
	// HealthCheckPath makes the health check an HTTP GET (2xx is healthy); "" checks TCP connect.
	HealthCheckPath string
}

// InboundListenerName names the reverse direction's listener.
func InboundListenerName(addr string, port uint32) string {
	return "inbound_" + ListenerName(addr, port)
}

// InboundClusterName is Istio's inbound naming, inbound|PORT||HOST, for a VM service port.
func InboundClusterName(port uint32, host string) string {
	return "inbound|" + strconv.Itoa(int(port)) + "||" + host
}

// InboundStatPrefix is a VM service port's stat prefix (HCM or tcp_proxy): dot-free, so Envoy's
// Prometheus output keeps it whole as the label (see StatPrefix).
func InboundStatPrefix(port uint32, host string) string {
	return "inbound_" + strconv.Itoa(int(port)) + "_" + strings.ReplaceAll(host, ".", "_")
}

// InboundALPNHTTP is what the inbound side negotiates on an HTTP port, as a sidecar's STRICT
// inbound chain does: a sidecar client offers istio-http/1.1, istio, http/1.1 and gets http/1.1.
// TCP ports negotiate nothing: istio-peer-exchange would have the client's metadata-exchange
// filter wait for a header the fleet does not write.
var InboundALPNHTTP = []string{"h2", "http/1.1"}

// XFCC is the header the inbound side sets with the caller's identity.
const XFCC = "x-forwarded-client-cert"

// InboundAccessLogFormat is the inbound access log line: the VM service (SNI), the caller's
// principal and the backend, besides Envoy's usual fields.
const InboundAccessLogFormat = `[%START_TIME%] inbound "%REQUESTED_SERVER_NAME%" peer="%DOWNSTREAM_PEER_URI_SAN%" "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%UPSTREAM_HOST%" "%UPSTREAM_CLUSTER%"` + "\n"

func inboundAccessLogs(enabled bool) []*accesslog.AccessLog {
	if !enabled {
		return nil
	}
	return []*accesslog.AccessLog{{
		Name: "envoy.access_loggers.stdout",
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: mustAny(&streamlog.StdoutAccessLog{
			AccessLogFormat: &streamlog.StdoutAccessLog_LogFormat{LogFormat: &core.SubstitutionFormatString{
				Format: &core.SubstitutionFormatString_TextFormatSource{TextFormatSource: &core.DataSource{
					Specifier: &core.DataSource_InlineString{InlineString: InboundAccessLogFormat},
				}},
			}},
		})},
	}}
}

// translateInbound adds the inbound listener and the VM clusters to res.
func translateInbound(r *Reverse, opts Options, res *Resources) {
	if r == nil || len(r.Services) == 0 {
		return
	}
	l := &listener.Listener{
		Name:    InboundListenerName(r.Address, r.Port),
		Address: socketAddress(r.Address, r.Port),
		// The SNI and ALPN the chains match on come from the ClientHello.
		ListenerFilters: []*listener.ListenerFilter{{
			Name:       wellknown.TlsInspector,
			ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspector.TlsInspector{})},
		}},
	}
	services := slices.Clone(r.Services)
	slices.SortFunc(services, func(a, b ReverseService) int { return strings.Compare(a.Host, b.Host) })
	for _, svc := range services {
		for _, p := range svc.Ports {
			name := InboundClusterName(p.Number, svc.Host)
			res.Clusters = append(res.Clusters, inboundCluster(name, svc, p, r))
			hosts := append([]string{svc.Host}, svc.Aliases...)
			snis := make([]string, 0, len(hosts))
			for _, h := range hosts {
				snis = append(snis, SNI(p.Number, "", h))
			}
			chain := &listener.FilterChain{
				Name: SNI(p.Number, "", svc.Host),
				FilterChainMatch: &listener.FilterChainMatch{
					ServerNames:       snis,
					TransportProtocol: "tls",
				},
				TransportSocket: &core.TransportSocket{
					Name:       wellknown.TransportSocketTLS,
					ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: mustAny(inboundTLS(r.TrustDomain, p.Protocol))},
				},
			}
			if p.Protocol.IsHTTP() {
				chain.Filters = []*listener.Filter{inboundHCM(name, svc, p, opts)}
			} else {
				chain.Filters = inboundTCP(name, svc, p, opts)
			}
			l.FilterChains = append(l.FilterChains, chain)
		}
	}
	res.Listeners = append(res.Listeners, l)
}

// inboundTLS is the downstream TLS of a chain: as a sidecar's STRICT inbound side.
func inboundTLS(trustDomain string, p catalog.Protocol) *tlsv3.DownstreamTlsContext {
	var alpn []string
	if p.IsHTTP() {
		alpn = slices.Clone(InboundALPNHTTP)
	}
	return &tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams: &tlsv3.TlsParameters{
				TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2,
				TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3,
			},
			AlpnProtocols: alpn,
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{
				Name: SecretCertificate, SdsConfig: ADSConfigSource(),
			}},
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
				CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
					DefaultValidationContext: &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
						SanType: tlsv3.SubjectAltNameMatcher_URI,
						Matcher: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://" + trustDomain + "/"}},
					}}},
					ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: SecretRoots, SdsConfig: ADSConfigSource()},
				},
			},
		},
	}
}

// allowPrincipals allows callers whose certificate names one of ids (URI SAN, exact). No ids
// gives an ALLOW policy set with no policy, which denies everyone: deliberately, an empty list
// is not "anyone".
func allowPrincipals(ids []string) *rbacconfig.RBAC {
	r := &rbacconfig.RBAC{Action: rbacconfig.RBAC_ALLOW}
	if len(ids) == 0 {
		return r
	}
	principals := make([]*rbacconfig.Principal, 0, len(ids))
	for _, id := range ids {
		principals = append(principals, &rbacconfig.Principal{Identifier: &rbacconfig.Principal_Authenticated_{
			Authenticated: &rbacconfig.Principal_Authenticated{PrincipalName: &matcher.StringMatcher{
				MatchPattern: &matcher.StringMatcher_Exact{Exact: id},
			}},
		}})
	}
	r.Policies = map[string]*rbacconfig.Policy{"allowed-principals": {
		Permissions: []*rbacconfig.Permission{{Rule: &rbacconfig.Permission_Any{Any: true}}},
		Principals:  principals,
	}}
	return r
}

// inboundRetry retries on another backend what never reached one (connect failure) and, for
// idempotent methods, a request whose connection the backend reset (a VM that just died): with
// another backend left, losing one fails no such request.
func inboundRetry() *route.RetryPolicy {
	rp := connectRetry(nil)
	rp.RetryOn = "connect-failure,reset"
	rp.NumRetries = wrapperspb.UInt32(2)
	rp.RetriableRequestHeaders = []*route.HeaderMatcher{{
		Name: ":method",
		HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: &matcher.StringMatcher{
			MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: "GET|HEAD|OPTIONS|PUT|DELETE|TRACE"}},
		}},
	}}
	return rp
}

func inboundHCM(clusterName string, svc ReverseService, p ReversePort, opts Options) *listener.Filter {
	manager := &hcm.HttpConnectionManager{
		CodecType:  hcm.HttpConnectionManager_AUTO,
		StatPrefix: InboundStatPrefix(p.Number, svc.Host),
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: InboundStatPrefix(p.Number, svc.Host),
			VirtualHosts: []*route.VirtualHost{{
				// The chain is the service: every Host the caller sends reaches it.
				Name:    svc.Host + ":" + strconv.Itoa(int(p.Number)),
				Domains: []string{"*"},
				Routes: []*route.Route{{
					Name:  "default",
					Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
					Action: &route.Route_Route{Route: &route.RouteAction{
						ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName},
						Timeout:          durationpb.New(0),
						RetryPolicy:      inboundRetry(),
					}},
				}},
			}},
			ValidateClusters: wrapperspb.Bool(false),
			// Istio's peer metadata headers would let a caller claim another workload to the VM.
			InternalOnlyHeaders: slices.Clone(InternalOnlyHeaders),
		}},
		HttpFilters: []*hcm.HttpFilter{
			{Name: HTTPRBACFilter, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&rbachttp.RBAC{Rules: allowPrincipals(svc.Principals)})}},
			{Name: wellknown.Router, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&router.Router{SuppressEnvoyHeaders: true})}},
		},
		UseRemoteAddress:           wrapperspb.Bool(true),
		ServerHeaderTransformation: hcm.HttpConnectionManager_PASS_THROUGH,
		HttpProtocolOptions:        &core.Http1ProtocolOptions{AcceptHttp_10: true},
		InternalAddressConfig:      noInternalAddresses(),
		GenerateRequestId:          wrapperspb.Bool(true),
		// The caller's identity goes to the VM in x-forwarded-client-cert, in Envoy's format
		// (By=<fleet>;Hash=<caller cert sha256>;Subject="";URI=<caller>); what the caller sent
		// in that header is dropped first, never trusted.
		ForwardClientCertDetails: hcm.HttpConnectionManager_SANITIZE_SET,
		SetCurrentClientCertDetails: &hcm.HttpConnectionManager_SetCurrentClientCertDetails{
			Subject: wrapperspb.Bool(true),
			Uri:     true,
		},
		AccessLog: inboundAccessLogs(opts.AccessLog),
	}
	requestLimits(manager, opts.Limits)
	return &listener.Filter{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(manager)}}
}

func inboundTCP(clusterName string, svc ReverseService, p ReversePort, opts Options) []*listener.Filter {
	prefix := InboundStatPrefix(p.Number, svc.Host)
	return []*listener.Filter{
		{
			// Decides on the caller's certificate, before tcp_proxy passes any byte on.
			Name: NetworkRBACFilter,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(&rbacnet.RBAC{
				StatPrefix: "tcp." + prefix + ".",
				Rules:      allowPrincipals(svc.Principals),
			})},
		},
		{
			Name: wellknown.TCPProxy,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxy.TcpProxy{
				StatPrefix:         prefix,
				ClusterSpecifier:   &tcpproxy.TcpProxy_Cluster{Cluster: clusterName},
				MaxConnectAttempts: wrapperspb.UInt32(3),
				AccessLog:          inboundAccessLogs(opts.AccessLog),
			})},
		},
	}
}

// inboundCluster reaches a VM service port's backends in plain HTTP or TCP: round robin over
// the healthy ones (active health checks), with outlier ejection. All-IP backends make a STATIC
// cluster; a DNS name makes it STRICT_DNS (every address the name resolves to, re-resolved
// every 5s, Envoy's default).
func inboundCluster(name string, svc ReverseService, p ReversePort, r *Reverse) *cluster.Cluster {
	allIPs := true
	var eps []*endpoint.LbEndpoint
	for _, b := range svc.Backends {
		if _, err := netip.ParseAddr(b.Host); err != nil {
			allIPs = false
		}
		port := b.Port
		if port == 0 {
			port = p.TargetPort
		}
		eps = append(eps, &endpoint.LbEndpoint{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
			Address: socketAddress(b.Host, port),
		}}})
	}
	typ := cluster.Cluster_STATIC
	if !allIPs {
		typ = cluster.Cluster_STRICT_DNS
	}
	hc := &core.HealthCheck{
		Timeout:  durationpb.New(r.HealthCheck.Timeout),
		Interval: durationpb.New(r.HealthCheck.Interval),
		// Envoy checks a cluster that has seen no traffic yet every no_traffic_interval (60s by
		// default) and keeps the next check on that schedule: a VM that fails right after
		// startup would take a minute to be noticed. The same interval everywhere.
		NoTrafficInterval:  durationpb.New(r.HealthCheck.Interval),
		UnhealthyThreshold: wrapperspb.UInt32(r.HealthCheck.UnhealthyThreshold),
		HealthyThreshold:   wrapperspb.UInt32(r.HealthCheck.HealthyThreshold),
		// A backend that closes the connection is checked again at once, not an interval later.
		HealthChecker: &core.HealthCheck_TcpHealthCheck_{TcpHealthCheck: &core.HealthCheck_TcpHealthCheck{}},
	}
	if p.HealthCheckPath != "" {
		hc.HealthChecker = &core.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &core.HealthCheck_HttpHealthCheck{
			Host: svc.Host, Path: p.HealthCheckPath,
		}}
	}
	c := &cluster.Cluster{
		Name:                 name,
		AltStatName:          ClusterStatName(name),
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(r.ConnectTimeout),
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
		LoadAssignment: &endpoint.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints:   []*endpoint.LocalityLbEndpoints{{LbEndpoints: eps}},
		},
		HealthChecks: []*core.HealthCheck{hc},
		CircuitBreakers: &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
			MaxConnections:     wrapperspb.UInt32(maxCircuit),
			MaxPendingRequests: wrapperspb.UInt32(maxCircuit),
			MaxRequests:        wrapperspb.UInt32(maxCircuit),
			MaxRetries:         wrapperspb.UInt32(maxCircuit),
		}}},
		OutlierDetection: &cluster.OutlierDetection{
			Consecutive_5Xx:                    wrapperspb.UInt32(r.Outlier.ConsecutiveErrors),
			ConsecutiveGatewayFailure:          wrapperspb.UInt32(r.Outlier.ConsecutiveErrors),
			EnforcingConsecutiveGatewayFailure: wrapperspb.UInt32(100),
			Interval:                           durationpb.New(r.Outlier.Interval),
			BaseEjectionTime:                   durationpb.New(r.Outlier.BaseEjectionTime),
			MaxEjectionPercent:                 wrapperspb.UInt32(r.Outlier.MaxEjectionPercent),
		},
	}
	if p.Protocol.IsHTTP() {
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{HTTPProtocolOptionsKey: mustAny(&upstreamhttp.HttpProtocolOptions{
			UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &core.Http1ProtocolOptions{}},
			}},
		})}
	}
	return c
}

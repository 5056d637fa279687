package dataplane

import (
	"strings"
	"testing"

	accesslogpb "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	fileal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	streamlog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// TestRefusesWhatNothingEmits: configuration the control plane never emits (see
// TestGoldenAccepted for what it does) is refused with the field named, not half-supported.
func TestRefusesWhatNothingEmits(t *testing.T) {
	for _, c := range []struct {
		name  string
		parse func() error
		want  string
	}{
		{"a secret read from a file", func() error {
			_, err := parseSecret(&tlsv3.Secret{Name: "ROOTCA", Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: &core.DataSource{Specifier: &core.DataSource_Filename{Filename: "/etc/ssl/certs/ca-certificates.crt"}},
			}}})
			return err
		}, `secret "ROOTCA": validation_context.trusted_ca: filename and environment_variable are not supported; send the data inline`},
		{"a secret read from the environment", func() error {
			_, err := parseSecret(&tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: &core.DataSource{Specifier: &core.DataSource_EnvironmentVariable{EnvironmentVariable: "HOME"}},
			}}})
			return err
		}, `secret "default": tls_certificate: certificate_chain: filename and environment_variable are not supported; send the data inline`},
		{"an access log to a file", func() error {
			_, err := New(Options{}).parseAccessLogs([]*accesslogpb.AccessLog{{Name: "envoy.access_loggers.file",
				ConfigType: accessLogTyped(mustAnyT(t, &fileal.FileAccessLog{Path: "/tmp/access.log"}))}}, "access_log", true)
			return err
		}, "access_log[0] (envoy.access_loggers.file): access logger envoy.extensions.access_loggers.file.v3.FileAccessLog is not supported; use stdout"},
		{"an access log to stderr", func() error {
			_, err := New(Options{}).parseAccessLogs([]*accesslogpb.AccessLog{{Name: "envoy.access_loggers.stderr",
				ConfigType: accessLogTyped(mustAnyT(t, &streamlog.StderrAccessLog{}))}}, "access_log", false)
			return err
		}, "access logger envoy.extensions.access_loggers.stream.v3.StderrAccessLog is not supported; use stdout"},
		{"the deprecated cluster http2_protocol_options", func() error {
			c := proto.Clone(translated(t).Clusters[0]).(*clusterpb.Cluster)
			//lint:ignore SA1019 the deprecated field under test
			c.Http2ProtocolOptions = &core.Http2ProtocolOptions{}
			_, err := New(Options{}).parseCluster(c)
			return err
		}, "http2_protocol_options: deprecated and not supported; use typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]"},
		{"endpoints from a config source other than ADS", func() error {
			c := proto.Clone(translated(t).Clusters[0]).(*clusterpb.Cluster)
			c.EdsClusterConfig.EdsConfig = &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Self{Self: &core.SelfConfigSource{}}}
			_, err := New(Options{}).parseCluster(c)
			return err
		}, "eds_cluster_config.eds_config: only ads is supported by the built-in data plane (it has one ADS stream)"},
		{"endpoints without a config source", func() error {
			c := proto.Clone(translated(t).Clusters[0]).(*clusterpb.Cluster)
			c.EdsClusterConfig = nil
			_, err := New(Options{}).parseCluster(c)
			return err
		}, "eds_cluster_config.eds_config: only ads is supported"},
		{"an RBAC DENY policy", func() error {
			_, err := parseRBAC(&rbacconfig.RBAC{Action: rbacconfig.RBAC_DENY}, "rules")
			return err
		}, "rules.action: DENY is not supported; use ALLOW"},
		{"RBAC permissions other than any", func() error {
			_, err := parseRBAC(&rbacconfig.RBAC{Policies: map[string]*rbacconfig.Policy{"p": {
				Permissions: []*rbacconfig.Permission{{Rule: &rbacconfig.Permission_OrRules{OrRules: &rbacconfig.Permission_Set{}}}},
			}}}, "rules")
			return err
		}, "rules.policies[p].permissions[0]: permission *rbacv3.Permission_OrRules is not supported by the built-in data plane; only any: true"},
		{"an RBAC principal by remote_ip", func() error {
			_, err := parsePrincipal(&rbacconfig.Principal{Identifier: &rbacconfig.Principal_RemoteIp{RemoteIp: &core.CidrRange{AddressPrefix: "10.0.0.0"}}}, "principals[0]")
			return err
		}, "principals[0]: principal *rbacv3.Principal_RemoteIp is not supported by the built-in data plane; use direct_remote_ip or authenticated"},
		{"an RBAC principal matching anyone", func() error {
			_, err := parsePrincipal(&rbacconfig.Principal{Identifier: &rbacconfig.Principal_Any{Any: true}}, "principals[0]")
			return err
		}, "principal *rbacv3.Principal_Any is not supported"},
		{"an RBAC principal negated", func() error {
			_, err := parsePrincipal(&rbacconfig.Principal{Identifier: &rbacconfig.Principal_NotId{NotId: &rbacconfig.Principal{}}}, "principals[0]")
			return err
		}, "principal *rbacv3.Principal_NotId is not supported"},
		{"an RBAC principal authenticated by anyone", func() error {
			_, err := parsePrincipal(&rbacconfig.Principal{Identifier: &rbacconfig.Principal_Authenticated_{Authenticated: &rbacconfig.Principal_Authenticated{}}}, "principals[0]")
			return err
		}, "principals[0].authenticated.principal_name: required"},
		{"a connection limit behind a runtime flag", func() error {
			l := proto.Clone(translated(t).Listeners[0]).(*listener.Listener)
			cl := &connlimit.ConnectionLimit{StatPrefix: "x", MaxConnections: wrapperspb.UInt64(1),
				RuntimeEnabled: &core.RuntimeFeatureFlag{DefaultValue: wrapperspb.Bool(false), RuntimeKey: "x"}}
			l.FilterChains[0].Filters[0].ConfigType = &listener.Filter_TypedConfig{TypedConfig: mustAnyT(t, cl)}
			_, err := New(Options{}).parseListener(l, "")
			return err
		}, "filter_chains[0].filters[0] (envoy.filters.network.connection_limit).runtime_enabled: not supported; the built-in data plane has no runtime"},
		{"HTTP upgrades", func() error {
			_, err := New(Options{}).parseHCM(&hcm.HttpConnectionManager{UpgradeConfigs: []*hcm.HttpConnectionManager_UpgradeConfig{{UpgradeType: "websocket"}},
				RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{ConfigSource: controlplane.ADSConfigSource(), RouteConfigName: "80"}}}, "hcm")
			return err
		}, "hcm.upgrade_configs: not supported"},
		{"an HCM codec other than AUTO", func() error {
			_, err := New(Options{}).parseHCM(&hcm.HttpConnectionManager{CodecType: hcm.HttpConnectionManager_HTTP1,
				RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{ConfigSource: controlplane.ADSConfigSource(), RouteConfigName: "80"}}}, "hcm")
			return err
		}, "hcm.codec_type: HTTP1 is not supported by the built-in data plane; use AUTO"},
		{"a string matcher ignoring case", func() error {
			_, err := parsePrincipal(authenticatedBy(&matcher.StringMatcher{IgnoreCase: true, MatchPattern: &matcher.StringMatcher_Exact{Exact: "spiffe://cluster.local/ns/a/sa/b"}}), "principals[0]")
			return err
		}, "principals[0].authenticated.principal_name: ignore_case: not supported by the built-in data plane"},
		{"a suffix string matcher", func() error {
			_, err := parsePrincipal(authenticatedBy(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Suffix{Suffix: "/sa/b"}}), "principals[0]")
			return err
		}, "principals[0].authenticated.principal_name: *matcherv3.StringMatcher_Suffix is not supported by the built-in data plane; use exact, prefix or safe_regex"},
		{"a contains string matcher", func() error {
			_, err := parsePrincipal(authenticatedBy(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Contains{Contains: "/ns/a/"}}), "principals[0]")
			return err
		}, "*matcherv3.StringMatcher_Contains is not supported by the built-in data plane"},
		{"an exact path route match", func() error {
			_, err := parseRoute(&route.Route{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Path{Path: "/x"}}}, "routes[0]")
			return err
		}, "routes[0].match: *routev3.RouteMatch_Path is not supported by the built-in data plane; use prefix"},
		{"a case-insensitive route match", func() error {
			_, err := parseRoute(&route.Route{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}, CaseSensitive: wrapperspb.Bool(false)}}, "routes[0]")
			return err
		}, "routes[0].match.case_sensitive: false is not supported by the built-in data plane; leave it unset"},
		{"a per-route FilterConfig wrapper", func() error {
			_, _, err := parsePerFilter(map[string]*anypb.Any{"envoy.filters.http.rbac": mustAnyT(t, &route.FilterConfig{Disabled: true})}, "typed_per_filter_config")
			return err
		}, "typed_per_filter_config[envoy.filters.http.rbac]: envoy.config.route.v3.FilterConfig is not supported by the built-in data plane"},
		{"RBACPerRoute disabling the filter", func() error {
			_, _, err := parsePerFilter(map[string]*anypb.Any{"envoy.filters.http.rbac": mustAnyT(t, &rbachttp.RBACPerRoute{})}, "typed_per_filter_config")
			return err
		}, "typed_per_filter_config[envoy.filters.http.rbac].rbac.rules: required; the built-in data plane does not support RBACPerRoute without rules"},
		{"RBACPerRoute with empty rules", func() error {
			_, _, err := parsePerFilter(map[string]*anypb.Any{"envoy.filters.http.rbac": mustAnyT(t, &rbachttp.RBACPerRoute{Rbac: &rbachttp.RBAC{}})}, "typed_per_filter_config")
			return err
		}, "rbac.rules: required"},
		{"network RBAC on a plain listener", func() error {
			l := proto.Clone(translated(t).Listeners[0]).(*listener.Listener)
			l.FilterChains[0].Filters = append([]*listener.Filter{{Name: "envoy.filters.network.rbac",
				ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAnyT(t, &rbacnet.RBAC{StatPrefix: "x"})}}}, l.FilterChains[0].Filters...)
			_, err := New(Options{}).parseListener(l, "")
			return err
		}, "filter_chains[0].filters[0] (envoy.filters.network.rbac): network RBAC on a plain listener is not supported by the built-in data plane; match filter_chain_match.source_prefix_ranges"},
		{"an inline client certificate", func() error {
			_, err := parseUpstreamTLS(emittedTLS(t, func(c *tlsv3.CommonTlsContext) {
				c.TlsCertificateSdsSecretConfigs = nil
				c.TlsCertificates = []*tlsv3.TlsCertificate{{}}
			}))
			return err
		}, "common_tls_context.tls_certificates: inline certificates are not supported by the built-in data plane; use tls_certificate_sds_secret_configs"},
		{"a plain validation context", func() error {
			_, err := parseUpstreamTLS(emittedTLS(t, func(c *tlsv3.CommonTlsContext) {
				c.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{}}
			}))
			return err
		}, "common_tls_context: validation context *tlsv3.CommonTlsContext_ValidationContext is not supported by the built-in data plane; use combined_validation_context"},
		{"an SDS validation context alone", func() error {
			_, err := parseUpstreamTLS(emittedTLS(t, func(c *tlsv3.CommonTlsContext) {
				c.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
					ValidationContextSdsSecretConfig: c.GetCombinedValidationContext().GetValidationContextSdsSecretConfig()}
			}))
			return err
		}, "validation context *tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig is not supported by the built-in data plane"},
		{"an inline trusted_ca in upstream TLS", func() error {
			_, err := parseUpstreamTLS(emittedTLS(t, func(c *tlsv3.CommonTlsContext) {
				c.GetCombinedValidationContext().DefaultValidationContext.TrustedCa = &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "PEM"}}
			}))
			return err
		}, "common_tls_context.combined_validation_context.default_validation_context.trusted_ca: not supported by the built-in data plane; the trust bundle comes over SDS"},
		{"HttpProtocolOptions without an upstream protocol", func() error {
			c := proto.Clone(translated(t).Clusters[0]).(*clusterpb.Cluster)
			c.TypedExtensionProtocolOptions = map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAnyT(t, &upstreamhttp.HttpProtocolOptions{})}
			_, err := New(Options{}).parseCluster(c)
			return err
		}, "typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]: no upstream protocol set is not supported by the built-in data plane; use explicit_http_config"},
		{"a cluster without outlier detection", func() error {
			c := proto.Clone(translated(t).Clusters[0]).(*clusterpb.Cluster)
			c.OutlierDetection = nil
			_, err := New(Options{}).parseCluster(c)
			return err
		}, "outlier_detection: required; the built-in data plane does not support clusters without it"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.parse(); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want it to contain %q", err, c.want)
			}
		})
	}
}

// emittedTLS is the first translated cluster's upstream TLS context, changed by edit.
func emittedTLS(t *testing.T, edit func(*tlsv3.CommonTlsContext)) *tlsv3.UpstreamTlsContext {
	t.Helper()
	var u tlsv3.UpstreamTlsContext
	if err := translated(t).Clusters[0].GetTransportSocket().GetTypedConfig().UnmarshalTo(&u); err != nil {
		t.Fatal(err)
	}
	edit(u.CommonTlsContext)
	return &u
}

func authenticatedBy(m *matcher.StringMatcher) *rbacconfig.Principal {
	return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_Authenticated_{Authenticated: &rbacconfig.Principal_Authenticated{PrincipalName: m}}}
}

func mustAnyT(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

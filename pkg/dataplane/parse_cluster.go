package dataplane

import (
	"crypto/tls"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

type clusterConfig struct {
	name    string
	edsName string         // EDS resource; "" for a static cluster
	static  []endpointSpec // static clusters' endpoints
	proto   *clusterpb.Cluster

	connectTimeout time.Duration
	tls            *tlsSpec // nil: plain TCP upstream
	http2          bool
	outlier        *outlierSpec
	health         *healthSpec // active health check (health.go); nil: none
	dns            []dnsTarget // STRICT_DNS endpoints, resolved by health.go's loop
}

type tlsSpec struct {
	sni  string
	alpn []string
	// SDS names of the certificate and the trust bundle: the control plane sends both over SDS,
	// never inline.
	certSecret  string
	rootsSecret string
	sans        []sanMatcher
	minVersion  uint16
	maxVersion  uint16
	sessionKeys int // max_session_keys: TLS sessions kept for resumption, 0 for none
}

type sanMatcher struct {
	typ   tlsv3.SubjectAltNameMatcher_SanType
	match func(string) bool
}

type outlierSpec struct {
	consec5xx, consecGateway       uint32
	enforce5xx, enforceGateway     uint32 // percent
	interval, baseEjection, maxEje time.Duration
	maxEjectionPercent             uint32
}

type endpointSpec struct {
	addr     string // ip:port
	hostname string
	healthy  bool
	priority uint32 // EDS priority level (priority.go)
}

func (dp *DataPlane) parseCluster(c *clusterpb.Cluster) (*clusterConfig, error) {
	name := c.GetName()
	if name == "" {
		return nil, errors.New("cluster without a name")
	}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("cluster %q: %s", name, fmt.Sprintf(format, args...))
	}
	cfg := &clusterConfig{name: name, proto: c, connectTimeout: duration(c.GetConnectTimeout(), 5*time.Second)}
	switch t := c.GetClusterDiscoveryType().(type) {
	case *clusterpb.Cluster_Type:
		switch t.Type {
		case clusterpb.Cluster_EDS:
			if err := checkADS(c.GetEdsClusterConfig().GetEdsConfig(), "eds_cluster_config.eds_config"); err != nil {
				return nil, fail("%v", err)
			}
			cfg.edsName = c.GetEdsClusterConfig().GetServiceName()
			if cfg.edsName == "" {
				cfg.edsName = name
			}
		case clusterpb.Cluster_STATIC:
			eps, err := parseCLA(c.GetLoadAssignment())
			if err != nil {
				return nil, fail("load_assignment: %v", err)
			}
			cfg.static = eps
		case clusterpb.Cluster_STRICT_DNS:
			targets, err := parseDNSTargets(c)
			if err != nil {
				return nil, fail("%v", err)
			}
			cfg.dns = targets
		default:
			return nil, fail("type: %s is not supported by the built-in data plane; use EDS, STATIC or STRICT_DNS", t.Type)
		}
	case nil:
		return nil, fail("type: required (EDS or STATIC)")
	default:
		return nil, fail("cluster_type: custom cluster types are not supported; use type EDS or STATIC")
	}
	if c.GetLbPolicy() != clusterpb.Cluster_ROUND_ROBIN {
		return nil, fail("lb_policy: %s is not supported; use ROUND_ROBIN", c.GetLbPolicy())
	}
	if c.GetLoadBalancingPolicy() != nil {
		return nil, fail("load_balancing_policy: not supported; use lb_policy ROUND_ROBIN")
	}
	hc, err := parseHealthChecks(c.GetHealthChecks())
	if err != nil {
		return nil, fail("%v", err)
	}
	cfg.health = hc
	if len(c.GetTransportSocketMatches()) > 0 {
		return nil, fail("transport_socket_matches: not supported; use transport_socket")
	}
	//lint:ignore SA1019 read only to refuse it: the control plane sets typed_extension_protocol_options
	if c.GetHttp2ProtocolOptions() != nil {
		return nil, fail("http2_protocol_options: deprecated and not supported; use typed_extension_protocol_options[%s]", nameHTTPOpts)
	}
	for key, a := range c.GetTypedExtensionProtocolOptions() {
		f := "typed_extension_protocol_options[" + key + "]"
		m, err := unpack(a, f)
		if err != nil {
			return nil, fail("%v", err)
		}
		if fullName(m) != nameHTTPOpts {
			return nil, fail("%s: %s is not supported; only %s", f, fullName(m), nameHTTPOpts)
		}
		h2, err := parseHTTPOptions(m.(*upstreamhttp.HttpProtocolOptions), f)
		if err != nil {
			return nil, fail("%v", err)
		}
		cfg.http2 = h2
	}
	if ts := c.GetTransportSocket(); ts != nil {
		m, err := unpack(ts.GetTypedConfig(), "transport_socket ("+ts.GetName()+")")
		if err != nil {
			return nil, fail("%v", err)
		}
		if fullName(m) != nameUpstreamTL {
			return nil, fail("transport_socket: %s is not supported; only %s", fullName(m), nameUpstreamTL)
		}
		spec, err := parseUpstreamTLS(m.(*tlsv3.UpstreamTlsContext))
		if err != nil {
			return nil, fail("transport_socket: %v", err)
		}
		cfg.tls = spec
	}
	// The control plane gives every cluster outlier detection.
	od := c.GetOutlierDetection()
	if od == nil {
		return nil, fail("outlier_detection: required; the built-in data plane does not support clusters without it")
	}
	cfg.outlier = parseOutlier(od)
	if od.GetEnforcingFailurePercentage().GetValue() > 0 || od.GetEnforcingFailurePercentageLocalOrigin().GetValue() > 0 {
		return nil, fail("outlier_detection: failure percentage ejection is not supported; use consecutive_5xx / consecutive_gateway_failure")
	}
	if od.GetSplitExternalLocalOriginErrors() {
		return nil, fail("outlier_detection.split_external_local_origin_errors: not supported")
	}
	if od.GetMaxEjectionPercent().GetValue() > 100 {
		return nil, fail("outlier_detection.max_ejection_percent: %d is over 100", od.GetMaxEjectionPercent().GetValue())
	}
	return cfg, nil
}

func parseHTTPOptions(o *upstreamhttp.HttpProtocolOptions, field string) (bool, error) {
	switch p := o.GetUpstreamProtocolOptions().(type) {
	case *upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_:
		switch p.ExplicitHttpConfig.GetProtocolConfig().(type) {
		case *upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions:
			return false, nil
		case *upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions:
			return true, nil
		default:
			return false, fmt.Errorf("%s.explicit_http_config: only http_protocol_options (HTTP/1.1) and http2_protocol_options are supported", field)
		}
	case nil:
		// The control plane always names the upstream protocol.
		return false, fmt.Errorf("%s: no upstream protocol set is not supported by the built-in data plane; use explicit_http_config", field)
	default:
		return false, fmt.Errorf("%s: %T is not supported; use explicit_http_config", field, o.GetUpstreamProtocolOptions())
	}
}

func parseOutlier(od *clusterpb.OutlierDetection) *outlierSpec {
	u32 := func(v interface{ GetValue() uint32 }, isNil bool, def uint32) uint32 {
		if isNil {
			return def
		}
		return v.GetValue()
	}
	s := &outlierSpec{
		consec5xx:          u32(od.GetConsecutive_5Xx(), od.GetConsecutive_5Xx() == nil, 5),
		consecGateway:      u32(od.GetConsecutiveGatewayFailure(), od.GetConsecutiveGatewayFailure() == nil, 5),
		enforce5xx:         u32(od.GetEnforcingConsecutive_5Xx(), od.GetEnforcingConsecutive_5Xx() == nil, 100),
		enforceGateway:     u32(od.GetEnforcingConsecutiveGatewayFailure(), od.GetEnforcingConsecutiveGatewayFailure() == nil, 0),
		interval:           duration(od.GetInterval(), 10*time.Second),
		baseEjection:       duration(od.GetBaseEjectionTime(), 30*time.Second),
		maxEje:             duration(od.GetMaxEjectionTime(), 300*time.Second),
		maxEjectionPercent: u32(od.GetMaxEjectionPercent(), od.GetMaxEjectionPercent() == nil, 10),
	}
	if s.interval <= 0 {
		s.interval = 10 * time.Second
	}
	if s.maxEje < s.baseEjection {
		s.maxEje = s.baseEjection
	}
	return s
}

func parseUpstreamTLS(u *tlsv3.UpstreamTlsContext) (*tlsSpec, error) {
	s := &tlsSpec{sni: u.GetSni(), minVersion: tls.VersionTLS12, maxVersion: tls.VersionTLS13, sessionKeys: 1}
	if k := u.GetMaxSessionKeys(); k != nil { // Envoy's default is 1
		s.sessionKeys = int(k.GetValue())
	}
	if u.GetAllowRenegotiation() {
		return nil, errors.New("allow_renegotiation: not supported")
	}
	ctx := u.GetCommonTlsContext()
	if ctx == nil {
		return nil, errors.New("common_tls_context: required")
	}
	s.alpn = ctx.GetAlpnProtocols()
	if p := ctx.GetTlsParams(); p != nil {
		var err error
		if s.minVersion, err = tlsVersion(p.GetTlsMinimumProtocolVersion(), tls.VersionTLS12); err != nil {
			return nil, fmt.Errorf("common_tls_context.tls_params.tls_minimum_protocol_version: %v", err)
		}
		if s.maxVersion, err = tlsVersion(p.GetTlsMaximumProtocolVersion(), tls.VersionTLS13); err != nil {
			return nil, fmt.Errorf("common_tls_context.tls_params.tls_maximum_protocol_version: %v", err)
		}
		if len(p.GetCipherSuites()) > 0 || len(p.GetEcdhCurves()) > 0 || len(p.GetSignatureAlgorithms()) > 0 {
			return nil, errors.New("common_tls_context.tls_params: cipher suites, curves and signature algorithms cannot be set; Go's defaults are used")
		}
	}
	switch {
	case len(ctx.GetTlsCertificates()) > 0:
		return nil, errors.New("common_tls_context.tls_certificates: inline certificates are not supported by the built-in data plane; use tls_certificate_sds_secret_configs")
	case len(ctx.GetTlsCertificateSdsSecretConfigs()) > 1:
		return nil, errors.New("common_tls_context: only one client certificate is supported")
	case len(ctx.GetTlsCertificateSdsSecretConfigs()) == 1:
		sc := ctx.GetTlsCertificateSdsSecretConfigs()[0]
		if err := checkSDS(sc, "common_tls_context.tls_certificate_sds_secret_configs[0]"); err != nil {
			return nil, err
		}
		s.certSecret = sc.GetName()
	}
	if ctx.GetTlsCertificateProviderInstance() != nil || ctx.GetCustomHandshaker() != nil {
		return nil, errors.New("common_tls_context: certificate providers and custom handshakers are not supported; use SDS")
	}
	// The control plane emits a combined validation context only: its SAN matchers inline, the
	// trust bundle over SDS.
	var vc *tlsv3.CertificateValidationContext
	switch v := ctx.GetValidationContextType().(type) {
	case *tlsv3.CommonTlsContext_CombinedValidationContext:
		vc = v.CombinedValidationContext.GetDefaultValidationContext()
		sc := v.CombinedValidationContext.GetValidationContextSdsSecretConfig()
		if err := checkSDS(sc, "common_tls_context.combined_validation_context.validation_context_sds_secret_config"); err != nil {
			return nil, err
		}
		s.rootsSecret = sc.GetName()
	case nil:
		return nil, errors.New("common_tls_context: a validation context is required; the built-in data plane never connects without verifying the server")
	default:
		return nil, fmt.Errorf("common_tls_context: validation context %T is not supported by the built-in data plane; use combined_validation_context", v)
	}
	if vc != nil {
		if vc.GetTrustedCa() != nil {
			return nil, errors.New("common_tls_context.combined_validation_context.default_validation_context.trusted_ca: not supported by the built-in data plane; the trust bundle comes over SDS (validation_context_sds_secret_config)")
		}
		//lint:ignore SA1019 read only to refuse it
		if len(vc.GetMatchSubjectAltNames()) > 0 {
			return nil, errors.New("validation context match_subject_alt_names: deprecated and not supported; use match_typed_subject_alt_names")
		}
		if len(vc.GetVerifyCertificateSpki()) > 0 || len(vc.GetVerifyCertificateHash()) > 0 || vc.GetCrl() != nil ||
			vc.GetAllowExpiredCertificate() || vc.GetCustomValidatorConfig() != nil || vc.GetCaCertificateProviderInstance() != nil ||
			vc.GetTrustChainVerification() != tlsv3.CertificateValidationContext_VERIFY_TRUST_CHAIN {
			return nil, errors.New("validation context: only trusted_ca and match_typed_subject_alt_names are supported (no pinning, CRL, expired or untrusted chains)")
		}
		for i, m := range vc.GetMatchTypedSubjectAltNames() {
			f := fmt.Sprintf("validation context match_typed_subject_alt_names[%d]", i)
			switch m.GetSanType() {
			case tlsv3.SubjectAltNameMatcher_URI, tlsv3.SubjectAltNameMatcher_DNS, tlsv3.SubjectAltNameMatcher_EMAIL, tlsv3.SubjectAltNameMatcher_IP_ADDRESS:
			default:
				return nil, fmt.Errorf("%s.san_type: %s is not supported; use URI, DNS, EMAIL or IP_ADDRESS", f, m.GetSanType())
			}
			fn, err := stringMatcher(m.GetMatcher())
			if err != nil {
				return nil, fmt.Errorf("%s.matcher: %v", f, err)
			}
			s.sans = append(s.sans, sanMatcher{typ: m.GetSanType(), match: fn})
		}
	}
	if s.rootsSecret == "" {
		return nil, errors.New("common_tls_context.combined_validation_context.validation_context_sds_secret_config: a trust bundle is required")
	}
	return s, nil
}

func checkSDS(sc *tlsv3.SdsSecretConfig, field string) error {
	if sc.GetName() == "" {
		return fmt.Errorf("%s.name: required", field)
	}
	if sc.GetSdsConfig() == nil {
		return fmt.Errorf("%s.sds_config: inline (static) secrets are not supported; serve the secret over ADS", field)
	}
	return checkADS(sc.GetSdsConfig(), field+".sds_config")
}

func tlsVersion(v tlsv3.TlsParameters_TlsProtocol, def uint16) (uint16, error) {
	switch v {
	case tlsv3.TlsParameters_TLS_AUTO:
		return def, nil
	case tlsv3.TlsParameters_TLSv1_2:
		return tls.VersionTLS12, nil
	case tlsv3.TlsParameters_TLSv1_3:
		return tls.VersionTLS13, nil
	}
	return 0, fmt.Errorf("%s is not supported; use TLSv1_2 or TLSv1_3", v)
}

// stringMatcher compiles what the control plane emits: exact and prefix SAN and principal
// matchers, and the retriable-methods safe_regex. Case folding, suffix and contains are refused.
func stringMatcher(m *matcher.StringMatcher) (func(string) bool, error) {
	if m.GetIgnoreCase() {
		return nil, fmt.Errorf("ignore_case: not supported by the built-in data plane")
	}
	switch p := m.GetMatchPattern().(type) {
	case *matcher.StringMatcher_Exact:
		want := p.Exact
		return func(s string) bool { return s == want }, nil
	case *matcher.StringMatcher_Prefix:
		want := p.Prefix
		return func(s string) bool { return strings.HasPrefix(s, want) }, nil
	case *matcher.StringMatcher_SafeRegex:
		re, err := regexp.Compile("^(?:" + p.SafeRegex.GetRegex() + ")$")
		if err != nil {
			return nil, fmt.Errorf("safe_regex: %v", err)
		}
		return re.MatchString, nil
	}
	return nil, fmt.Errorf("%T is not supported by the built-in data plane; use exact, prefix or safe_regex", m.GetMatchPattern())
}

func readDataSource(d *core.DataSource) ([]byte, error) {
	switch s := d.GetSpecifier().(type) {
	case *core.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case *core.DataSource_InlineString:
		return []byte(s.InlineString), nil
	case nil:
		return nil, errors.New("empty data source")
	}
	// The control plane sends secrets inline; a config must not make the data plane read its
	// host's files or environment.
	return nil, errors.New("filename and environment_variable are not supported; send the data inline")
}

package dataplane

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	fileal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	streamlog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	transcoderpb "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// This file turns xDS resources into the data plane's own immutable configuration values. Every
// parse function is free of side effects on the running data plane, so a whole response can be
// checked before any of it is applied, and errors name the resource and the field.

func fullName(m proto.Message) protoreflect.FullName { return m.ProtoReflect().Descriptor().FullName() }

var (
	nameTCPProxy   = fullName(&tcpproxy.TcpProxy{})
	nameHCM        = fullName(&hcm.HttpConnectionManager{})
	nameNetRBAC    = fullName(&rbacnet.RBAC{})
	nameConnLimit  = fullName(&connlimit.ConnectionLimit{})
	nameHTTPRBAC   = fullName(&rbachttp.RBAC{})
	nameRBACRoute  = fullName(&rbachttp.RBACPerRoute{})
	nameRouter     = fullName(&router.Router{})
	nameStdout     = fullName(&streamlog.StdoutAccessLog{})
	nameStderr     = fullName(&streamlog.StderrAccessLog{})
	nameFileLog    = fullName(&fileal.FileAccessLog{})
	nameUpstreamTL = fullName(&tlsv3.UpstreamTlsContext{})
	nameHTTPOpts   = fullName(&upstreamhttp.HttpProtocolOptions{})
)

// unpack decodes a typed config, naming the field when its type is not linked in.
func unpack(a *anypb.Any, field string) (proto.Message, error) {
	if a == nil {
		return nil, fmt.Errorf("%s: typed_config is required", field)
	}
	m, err := a.UnmarshalNew()
	if err != nil {
		return nil, fmt.Errorf("%s: cannot decode typed_config %s: %v", field, a.GetTypeUrl(), err)
	}
	return m, nil
}

func duration(d *durationpb.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return d.AsDuration()
}

// ---- listeners ----

type listenerConfig struct {
	name  string
	addr  string // host:port to bind
	proto *listener.Listener
	// sources is the filter chain's source_prefix_ranges; nil matches every peer.
	sources *rbacEngine
	// netRBAC is the network RBAC filter; nil allows every peer.
	netRBAC *rbacEngine
	tcp     *tcpConfig
	http    *httpConfig
	// inbound is a TLS listener's chains by SNI (inbound.go); tcp and http are then nil.
	inbound *inboundConfig
	// maxConns is the connection_limit filter's max_connections (0: no limit); a connection
	// past it is closed after limitDelay.
	maxConns   int
	limitDelay time.Duration
}

type tcpConfig struct {
	cluster string
	// connectAttempts is max_connect_attempts: endpoints tried when connecting fails (Envoy: 1).
	connectAttempts int
	idleTimeout     time.Duration // 0: none
	logs            []*accessLogger
}

type httpConfig struct {
	routeName string      // RDS route configuration, or
	inline    *routeTable // an inline one
	headers   requestHeaders
	// rbac is the HTTP RBAC filter (its name and default rules); nil when the chain has none.
	rbac *httpRBAC
	// transcoder is the gRPC-JSON transcoder filter; nil when the chain has none.
	transcoder  *httpTranscoder
	logs        []*accessLogger
	idleTimeout time.Duration
	codec       hcm.HttpConnectionManager_CodecType
	// maxHeadBytes (max_request_headers_kb) bounds a request head: its request line and header
	// lines with their line ends, as Envoy counts them; maxHeaders (max_headers_count) bounds
	// the number of request headers, Host included.
	maxHeadBytes, maxHeaders int
}

type httpRBAC struct {
	name   string
	engine *rbacEngine // nil: no default rules, only per-route ones
}

// routeNames lists the RDS names a listener needs.
func (l *listenerConfig) routeName() string {
	if l.http != nil && l.http.inline == nil {
		return l.http.routeName
	}
	return ""
}

func (dp *DataPlane) parseListener(l *listener.Listener, override string) (*listenerConfig, error) {
	name := l.GetName()
	fail := func(format string, args ...any) error {
		return fmt.Errorf("listener %q: %s", name, fmt.Sprintf(format, args...))
	}
	if name == "" {
		return nil, errors.New("listener without a name")
	}
	sa := l.GetAddress().GetSocketAddress()
	if sa == nil {
		return nil, fail("address: a socket_address is required")
	}
	if sa.GetProtocol() != core.SocketAddress_TCP {
		return nil, fail("address.protocol: %s is not supported; only TCP", sa.GetProtocol())
	}
	if sa.GetNamedPort() != "" || sa.GetResolverName() != "" {
		return nil, fail("address: named ports and resolvers are not supported; use port_value")
	}
	host := sa.GetAddress()
	if override != "" {
		host = override
	}
	if net.ParseIP(host) == nil {
		return nil, fail("address.address: %q is not an IP address", sa.GetAddress())
	}
	cfg := &listenerConfig{name: name, addr: net.JoinHostPort(host, strconv.Itoa(int(sa.GetPortValue()))), proto: l}
	if isInbound(l) {
		return dp.parseInbound(l, cfg) // the reverse direction's mTLS listener (inbound.go)
	}
	if len(l.GetListenerFilters()) > 0 {
		return nil, fail("listener_filters: not supported by the built-in data plane (got %s)", l.GetListenerFilters()[0].GetName())
	}
	if l.GetDefaultFilterChain() != nil {
		return nil, fail("default_filter_chain: not supported; use one filter chain")
	}
	if len(l.GetAdditionalAddresses()) > 0 {
		return nil, fail("additional_addresses: not supported")
	}
	if len(l.GetFilterChains()) != 1 {
		return nil, fail("filter_chains: exactly one filter chain is supported, got %d", len(l.GetFilterChains()))
	}
	fc := l.GetFilterChains()[0]
	if m := fc.GetFilterChainMatch(); m != nil {
		rest := proto.Clone(m).(*listener.FilterChainMatch)
		rest.SourcePrefixRanges = nil
		if !proto.Equal(rest, &listener.FilterChainMatch{}) {
			return nil, fail("filter_chains[0].filter_chain_match: only source_prefix_ranges is supported")
		}
		sources, err := parseSourceRanges(m.GetSourcePrefixRanges(), "filter_chains[0].filter_chain_match.source_prefix_ranges")
		if err != nil {
			return nil, fail("%v", err)
		}
		cfg.sources = sources
	}
	if fc.GetTransportSocket() != nil {
		return nil, fail("filter_chains[0].transport_socket: downstream TLS is not supported; the plain listeners take plain connections")
	}
	filters := fc.GetFilters()
	if len(filters) == 0 {
		return nil, fail("filter_chains[0].filters: empty; a tcp_proxy or http_connection_manager filter is required")
	}
	for i, f := range filters {
		field := fmt.Sprintf("filter_chains[0].filters[%d] (%s)", i, f.GetName())
		if f.GetConfigDiscovery() != nil {
			return nil, fail("%s: config_discovery is not supported; use typed_config", field)
		}
		m, err := unpack(f.GetTypedConfig(), field)
		if err != nil {
			return nil, fail("%v", err)
		}
		last := i == len(filters)-1
		switch fullName(m) {
		case nameConnLimit:
			cl := m.(*connlimit.ConnectionLimit)
			switch {
			case last:
				return nil, fail("%s: connection_limit cannot be the last filter; a terminal filter must follow", field)
			case cfg.maxConns > 0:
				return nil, fail("%s: only one connection_limit filter is supported", field)
			case cl.GetMaxConnections().GetValue() == 0:
				return nil, fail("%s.max_connections: required, at least 1", field)
			case cl.GetRuntimeEnabled() != nil && !cl.GetRuntimeEnabled().GetDefaultValue().GetValue():
				// Without a runtime, the flag is its default: off.
				continue
			}
			cfg.maxConns = int(min(cl.GetMaxConnections().GetValue(), 1<<31))
			cfg.limitDelay = cl.GetDelay().AsDuration()
		case nameNetRBAC:
			r := m.(*rbacnet.RBAC)
			if last {
				return nil, fail("%s: RBAC cannot be the last filter; a terminal filter must follow", field)
			}
			if cfg.netRBAC != nil {
				return nil, fail("%s: only one network RBAC filter is supported", field)
			}
			if r.GetMatcher() != nil || r.GetShadowMatcher() != nil {
				return nil, fail("%s: matcher-based RBAC is not supported; use rules", field)
			}
			if r.GetEnforcementType() != rbacnet.RBAC_ONE_TIME_ON_FIRST_BYTE {
				return nil, fail("%s.enforcement_type: only ONE_TIME_ON_FIRST_BYTE is supported", field)
			}
			eng, err := parseRBAC(r.GetRules(), field+".rules")
			if err != nil {
				return nil, fail("%v", err)
			}
			if eng == nil {
				eng = &rbacEngine{deny: true} // no rules: nothing is denied
			}
			cfg.netRBAC = eng
		case nameTCPProxy:
			if !last {
				return nil, fail("%s: tcp_proxy is a terminal filter and must be last", field)
			}
			tc, err := dp.parseTCPProxy(m.(*tcpproxy.TcpProxy), field)
			if err != nil {
				return nil, fail("%v", err)
			}
			cfg.tcp = tc
		case nameHCM:
			if !last {
				return nil, fail("%s: http_connection_manager is a terminal filter and must be last", field)
			}
			hc, err := dp.parseHCM(m.(*hcm.HttpConnectionManager), field)
			if err != nil {
				return nil, fail("%v", err)
			}
			cfg.http = hc
		default:
			return nil, fail("%s: network filter %s is not supported by the built-in data plane; it supports %s, %s, %s and %s",
				field, fullName(m), nameConnLimit, nameNetRBAC, nameTCPProxy, nameHCM)
		}
	}
	return cfg, nil
}

func (dp *DataPlane) parseTCPProxy(t *tcpproxy.TcpProxy, field string) (*tcpConfig, error) {
	c := &tcpConfig{idleTimeout: duration(t.GetIdleTimeout(), time.Hour), connectAttempts: 1}
	if a := t.GetMaxConnectAttempts(); a != nil {
		c.connectAttempts = int(a.GetValue())
	}
	switch cs := t.GetClusterSpecifier().(type) {
	case *tcpproxy.TcpProxy_Cluster:
		if cs.Cluster == "" {
			return nil, fmt.Errorf("%s.cluster: empty", field)
		}
		c.cluster = cs.Cluster
	default:
		return nil, fmt.Errorf("%s: weighted_clusters are not supported; set cluster", field)
	}
	switch {
	case t.GetTunnelingConfig() != nil:
		return nil, fmt.Errorf("%s.tunneling_config: not supported", field)
	case len(t.GetHashPolicy()) > 0:
		return nil, fmt.Errorf("%s.hash_policy: not supported", field)
	case t.GetMetadataMatch() != nil:
		return nil, fmt.Errorf("%s.metadata_match: not supported", field)
	}
	logs, err := dp.parseAccessLogs(t.GetAccessLog(), field+".access_log", false)
	if err != nil {
		return nil, err
	}
	c.logs = logs
	return c, nil
}

func (dp *DataPlane) parseHCM(h *hcm.HttpConnectionManager, field string) (*httpConfig, error) {
	c := &httpConfig{
		idleTimeout: duration(h.GetCommonHttpProtocolOptions().GetIdleTimeout(), time.Hour),
		codec:       h.GetCodecType(),
		// Envoy's defaults when unset: 60 KiB and 100 headers.
		maxHeadBytes: 60 << 10,
		maxHeaders:   100,
	}
	if v := h.GetMaxRequestHeadersKb(); v != nil {
		if v.GetValue() == 0 || v.GetValue() > 8192 {
			return nil, fmt.Errorf("%s.max_request_headers_kb: %d is outside 1-8192", field, v.GetValue())
		}
		c.maxHeadBytes = int(v.GetValue()) << 10
	}
	if v := h.GetCommonHttpProtocolOptions().GetMaxHeadersCount(); v != nil {
		if v.GetValue() == 0 {
			return nil, fmt.Errorf("%s.common_http_protocol_options.max_headers_count: must be at least 1", field)
		}
		c.maxHeaders = int(v.GetValue())
	}
	rh, err := parseRequestHeaders(h, field)
	if err != nil {
		return nil, err
	}
	c.headers = rh
	switch h.GetCodecType() {
	case hcm.HttpConnectionManager_AUTO, hcm.HttpConnectionManager_HTTP1, hcm.HttpConnectionManager_HTTP2:
	default:
		return nil, fmt.Errorf("%s.codec_type: %s is not supported; use AUTO, HTTP1 or HTTP2", field, h.GetCodecType())
	}
	switch rs := h.GetRouteSpecifier().(type) {
	case *hcm.HttpConnectionManager_Rds:
		if err := checkADS(rs.Rds.GetConfigSource(), field+".rds.config_source"); err != nil {
			return nil, err
		}
		if rs.Rds.GetRouteConfigName() == "" {
			return nil, fmt.Errorf("%s.rds.route_config_name: required", field)
		}
		c.routeName = rs.Rds.GetRouteConfigName()
	case *hcm.HttpConnectionManager_RouteConfig:
		rt, err := parseRouteConfig(rs.RouteConfig)
		if err != nil {
			return nil, fmt.Errorf("%s.route_config: %v", field, err)
		}
		c.inline = rt
	default:
		return nil, fmt.Errorf("%s: route_specifier must be rds or route_config (scoped routes are not supported)", field)
	}
	if len(h.GetUpgradeConfigs()) > 0 {
		// Upgrades (WebSocket) are proxied on HTTP/1.1 upstreams regardless; accept the list.
		for i, u := range h.GetUpgradeConfigs() {
			if len(u.GetFilters()) > 0 {
				return nil, fmt.Errorf("%s.upgrade_configs[%d].filters: not supported", field, i)
			}
		}
	}
	filters := h.GetHttpFilters()
	if len(filters) == 0 {
		return nil, fmt.Errorf("%s.http_filters: empty; the router filter must be last", field)
	}
	for i, f := range filters {
		ff := fmt.Sprintf("%s.http_filters[%d] (%s)", field, i, f.GetName())
		if f.GetConfigDiscovery() != nil {
			return nil, fmt.Errorf("%s: config_discovery is not supported; use typed_config", ff)
		}
		if f.GetTypedConfig() == nil && f.GetIsOptional() {
			continue
		}
		m, err := unpack(f.GetTypedConfig(), ff)
		if err != nil {
			return nil, err
		}
		last := i == len(filters)-1
		switch fullName(m) {
		case nameHTTPRBAC:
			r := m.(*rbachttp.RBAC)
			if last {
				return nil, fmt.Errorf("%s: the router filter must be last", ff)
			}
			if c.rbac != nil {
				return nil, fmt.Errorf("%s: only one HTTP RBAC filter is supported", ff)
			}
			if r.GetMatcher() != nil || r.GetShadowMatcher() != nil || r.GetShadowRules() != nil {
				return nil, fmt.Errorf("%s: matcher-based and shadow RBAC are not supported; use rules", ff)
			}
			eng, err := parseRBAC(r.GetRules(), ff+".rules")
			if err != nil {
				return nil, err
			}
			c.rbac = &httpRBAC{name: f.GetName(), engine: eng}
		case nameTranscoder:
			if last {
				return nil, fmt.Errorf("%s: the router filter must be last", ff)
			}
			if c.transcoder != nil {
				return nil, fmt.Errorf("%s: only one gRPC-JSON transcoder filter is supported", ff)
			}
			tc, err := parseTranscoder(m.(*transcoderpb.GrpcJsonTranscoder), ff)
			if err != nil {
				return nil, err
			}
			c.transcoder = &httpTranscoder{name: f.GetName(), disabled: f.GetDisabled(), config: tc}
		case nameRouter:
			if !last {
				return nil, fmt.Errorf("%s: the router filter must be last", ff)
			}
		default:
			if f.GetIsOptional() {
				continue
			}
			return nil, fmt.Errorf("%s: HTTP filter %s is not supported by the built-in data plane; it supports %s, %s and %s",
				ff, fullName(m), nameHTTPRBAC, nameTranscoder, nameRouter)
		}
	}
	logs, err := dp.parseAccessLogs(h.GetAccessLog(), field+".access_log", true)
	if err != nil {
		return nil, err
	}
	c.logs = logs
	return c, nil
}

// checkADS accepts a config source that points at the ADS stream (or is unset, meaning the same).
func checkADS(cs *core.ConfigSource, field string) error {
	if cs == nil {
		return nil
	}
	switch cs.GetConfigSourceSpecifier().(type) {
	case *core.ConfigSource_Ads, nil:
		return nil
	case *core.ConfigSource_Self:
		return nil
	}
	return fmt.Errorf("%s: only ads is supported by the built-in data plane (it has one ADS stream)", field)
}

func (dp *DataPlane) parseAccessLogs(logs []*accesslog.AccessLog, field string, http bool) ([]*accessLogger, error) {
	var out []*accessLogger
	for i, l := range logs {
		f := fmt.Sprintf("%s[%d] (%s)", field, i, l.GetName())
		if l.GetFilter() != nil {
			return nil, fmt.Errorf("%s.filter: access log filters are not supported", f)
		}
		m, err := unpack(l.GetTypedConfig(), f)
		if err != nil {
			return nil, err
		}
		switch fullName(m) {
		case nameStdout:
			if m.(*streamlog.StdoutAccessLog).GetLogFormat() != nil {
				return nil, fmt.Errorf("%s.log_format: custom formats are not supported; the default format is used", f)
			}
			out = append(out, dp.logStdout)
		case nameStderr:
			if m.(*streamlog.StderrAccessLog).GetLogFormat() != nil {
				return nil, fmt.Errorf("%s.log_format: custom formats are not supported; the default format is used", f)
			}
			out = append(out, dp.logStderr)
		case nameFileLog:
			fl := m.(*fileal.FileAccessLog)
			if fl.GetAccessLogFormat() != nil {
				return nil, fmt.Errorf("%s.log_format: custom formats are not supported; the default format is used", f)
			}
			if fl.GetPath() == "" {
				return nil, fmt.Errorf("%s.path: required", f)
			}
			lg, err := dp.fileLogger(fl.GetPath())
			if err != nil {
				return nil, fmt.Errorf("%s.path: %v", f, err)
			}
			out = append(out, lg)
		default:
			return nil, fmt.Errorf("%s: access logger %s is not supported; use stdout, stderr or file", f, fullName(m))
		}
	}
	return out, nil
}

// ---- routes ----

type routeTable struct {
	name  string
	exact map[string]*virtualHost
	// suffix holds "*.example.com"-style domains as ".example.com", prefix "foo.*" as "foo.",
	// longest first (Envoy's order).
	suffix, prefix []wildcard
	any            *virtualHost
	proto          *route.RouteConfiguration
	// internalOnly are removed from requests that are not internal (canonical names).
	internalOnly []string
	// requestAdd are set on every request routed by this table, after internalOnly are removed;
	// responseRemove are removed from every upstream response (canonical names).
	requestAdd     []headerToSet
	responseRemove []string
}

type wildcard struct {
	s  string
	vh *virtualHost
}

type virtualHost struct {
	name   string
	routes []*routeEntry
	rbac   *perRouteRBAC // nil: the listener's filter config applies
	// transcoder is the virtual host's gRPC-JSON transcoder config; nil: the filter's own.
	transcoder *transcoderConfig
}

// perRouteRBAC overrides the HTTP RBAC filter for a virtual host or route.
type perRouteRBAC struct {
	disabled bool
	engine   *rbacEngine // nil: nothing enforced
}

type routeEntry struct {
	name string
	// exactly one of prefix or path is meaningful, per exact
	prefix, path  string
	exact         bool
	caseSensitive bool
	cluster       string
	timeout       time.Duration // 0: none
	rbac          *perRouteRBAC
	transcoder    *transcoderConfig
	// connectRetries: how often a request whose connection failed is tried on another endpoint.
	connectRetries int
	// resetRetry: retry_on has reset, so a request whose upstream connection was reset before
	// a response is tried again too (inbound VM clusters); retryMethods, when set, is the
	// retriable_request_headers :method condition every retry needs.
	resetRetry   bool
	retryMethods func(string) bool
}

// lookup finds the virtual host for a Host header, Envoy's way: exact, then the longest
// suffix wildcard, then the longest prefix wildcard, then "*".
func (t *routeTable) lookup(host string) *virtualHost {
	h := asciiLower(host)
	if vh := t.exact[h]; vh != nil {
		return vh
	}
	for _, w := range t.suffix {
		if len(h) > len(w.s) && strings.HasSuffix(h, w.s) {
			return w.vh
		}
	}
	for _, w := range t.prefix {
		if len(h) > len(w.s) && strings.HasPrefix(h, w.s) {
			return w.vh
		}
	}
	return t.any
}

func (vh *virtualHost) match(path string) *routeEntry {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	for _, r := range vh.routes {
		switch {
		case r.exact && r.caseSensitive:
			if path == r.path {
				return r
			}
		case r.exact:
			if asciiEqualFold(path, r.path) {
				return r
			}
		case r.caseSensitive:
			if strings.HasPrefix(path, r.prefix) {
				return r
			}
		default:
			if len(path) >= len(r.prefix) && asciiEqualFold(path[:len(r.prefix)], r.prefix) {
				return r
			}
		}
	}
	return nil
}

func parseRouteConfig(rc *route.RouteConfiguration) (*routeTable, error) {
	name := rc.GetName()
	t := &routeTable{name: name, exact: map[string]*virtualHost{}, proto: rc}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("route configuration %q: %s", name, fmt.Sprintf(format, args...))
	}
	if len(rc.GetTypedPerFilterConfig()) > 0 {
		return nil, fail("typed_per_filter_config: not supported at route configuration level; set it on virtual hosts")
	}
	if len(rc.GetResponseHeadersToAdd()) > 0 || len(rc.GetRequestHeadersToRemove()) > 0 {
		return nil, fail("response_headers_to_add and request_headers_to_remove: not supported; %s", headerMutationsSupported)
	}
	internalOnly, err := parseInternalOnly(rc.GetInternalOnlyHeaders(), "internal_only_headers")
	if err != nil {
		return nil, fail("%v", err)
	}
	t.internalOnly = internalOnly
	if t.requestAdd, err = parseHeadersToAdd(rc.GetRequestHeadersToAdd(), "request_headers_to_add"); err != nil {
		return nil, fail("%v", err)
	}
	if t.responseRemove, err = parseHeaderNames(rc.GetResponseHeadersToRemove(), "response_headers_to_remove"); err != nil {
		return nil, fail("%v", err)
	}
	seen := map[string]string{}
	for i, v := range rc.GetVirtualHosts() {
		vf := fmt.Sprintf("virtual_hosts[%d] (%s)", i, v.GetName())
		vh := &virtualHost{name: v.GetName()}
		if v.GetRequireTls() != route.VirtualHost_NONE {
			return nil, fail("%s.require_tls: not supported", vf)
		}
		if v.GetRetryPolicy() != nil || v.GetHedgePolicy() != nil || len(v.GetRateLimits()) > 0 || v.GetCors() != nil {
			return nil, fail("%s: retry, hedge, rate limit and CORS policies are not supported", vf)
		}
		if len(v.GetRequestHeadersToAdd()) > 0 || len(v.GetResponseHeadersToAdd()) > 0 || len(v.GetRequestHeadersToRemove()) > 0 || len(v.GetResponseHeadersToRemove()) > 0 {
			return nil, fail("%s: header manipulation is not supported here; %s", vf, headerMutationsSupported)
		}
		pr, tc, err := parsePerFilter(v.GetTypedPerFilterConfig(), vf+".typed_per_filter_config")
		if err != nil {
			return nil, fail("%v", err)
		}
		vh.rbac, vh.transcoder = pr, tc
		for j, r := range v.GetRoutes() {
			re, err := parseRoute(r, fmt.Sprintf("%s.routes[%d]", vf, j))
			if err != nil {
				return nil, fail("%v", err)
			}
			vh.routes = append(vh.routes, re)
		}
		if len(v.GetDomains()) == 0 {
			return nil, fail("%s.domains: empty", vf)
		}
		for _, d := range v.GetDomains() {
			d = asciiLower(d)
			if prev, dup := seen[d]; dup {
				return nil, fail("%s.domains: %q is also a domain of virtual host %q; domains must be unique", vf, d, prev)
			}
			seen[d] = v.GetName()
			switch {
			case d == "*":
				t.any = vh
			case strings.HasPrefix(d, "*"):
				t.suffix = append(t.suffix, wildcard{d[1:], vh})
			case strings.HasSuffix(d, "*"):
				t.prefix = append(t.prefix, wildcard{d[:len(d)-1], vh})
			case strings.Contains(d, "*"):
				return nil, fail("%s.domains: %q: a wildcard must be the first or last character", vf, d)
			default:
				t.exact[d] = vh
			}
		}
	}
	byLen := func(a, b wildcard) int { return len(b.s) - len(a.s) }
	slices.SortStableFunc(t.suffix, byLen)
	slices.SortStableFunc(t.prefix, byLen)
	return t, nil
}

func parsePerFilter(m map[string]*anypb.Any, field string) (*perRouteRBAC, *transcoderConfig, error) {
	var out *perRouteRBAC
	var tc *transcoderConfig
	for key, a := range m {
		f := field + "[" + key + "]"
		msg, err := unpack(a, f)
		if err != nil {
			return nil, nil, err
		}
		if fc, ok := msg.(*route.FilterConfig); ok {
			if fc.GetDisabled() && fc.GetConfig() == nil {
				out = &perRouteRBAC{disabled: true}
				continue
			}
			if msg, err = unpack(fc.GetConfig(), f+".config"); err != nil {
				return nil, nil, err
			}
		}
		if fullName(msg) == nameTranscoder {
			if tc, err = parseTranscoder(msg.(*transcoderpb.GrpcJsonTranscoder), f); err != nil {
				return nil, nil, err
			}
			continue
		}
		if fullName(msg) != nameRBACRoute {
			return nil, nil, fmt.Errorf("%s: per-filter config %s is not supported; only %s and %s", f, fullName(msg), nameRBACRoute, nameTranscoder)
		}
		pr := msg.(*rbachttp.RBACPerRoute)
		if pr.GetRbac() == nil {
			out = &perRouteRBAC{disabled: true}
			continue
		}
		if pr.GetRbac().GetMatcher() != nil || pr.GetRbac().GetShadowRules() != nil || pr.GetRbac().GetShadowMatcher() != nil {
			return nil, nil, fmt.Errorf("%s.rbac: matcher-based and shadow RBAC are not supported; use rules", f)
		}
		eng, err := parseRBAC(pr.GetRbac().GetRules(), f+".rbac.rules")
		if err != nil {
			return nil, nil, err
		}
		out = &perRouteRBAC{engine: eng}
	}
	return out, tc, nil
}

func parseRoute(r *route.Route, field string) (*routeEntry, error) {
	re := &routeEntry{name: r.GetName(), caseSensitive: r.GetMatch().GetCaseSensitive() == nil || r.GetMatch().GetCaseSensitive().GetValue()}
	m := r.GetMatch()
	switch ps := m.GetPathSpecifier().(type) {
	case *route.RouteMatch_Prefix:
		re.prefix = ps.Prefix
	case *route.RouteMatch_Path:
		re.path, re.exact = ps.Path, true
	default:
		return nil, fmt.Errorf("%s.match: only prefix and path matches are supported, got %T", field, m.GetPathSpecifier())
	}
	if len(m.GetHeaders()) > 0 || len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil || len(m.GetDynamicMetadata()) > 0 || m.GetTlsContext() != nil {
		return nil, fmt.Errorf("%s.match: header, query, gRPC, runtime, metadata and TLS matches are not supported", field)
	}
	a, ok := r.GetAction().(*route.Route_Route)
	if !ok {
		return nil, fmt.Errorf("%s: action %T is not supported; only route (to a cluster)", field, r.GetAction())
	}
	ra := a.Route
	c, ok := ra.GetClusterSpecifier().(*route.RouteAction_Cluster)
	if !ok || c.Cluster == "" {
		return nil, fmt.Errorf("%s.route: cluster is required (weighted_clusters and cluster_header are not supported)", field)
	}
	re.cluster = c.Cluster
	re.timeout = duration(ra.GetTimeout(), 15*time.Second)
	switch {
	case ra.GetPrefixRewrite() != "" || ra.GetRegexRewrite() != nil || ra.GetPathRewrite() != "":
		return nil, fmt.Errorf("%s.route: path rewrites are not supported", field)
	case ra.GetHostRewriteSpecifier() != nil:
		return nil, fmt.Errorf("%s.route: host rewrites are not supported", field)
	case ra.GetHedgePolicy() != nil || len(ra.GetRequestMirrorPolicies()) > 0:
		return nil, fmt.Errorf("%s.route: hedge and mirror policies are not supported", field)
	case len(ra.GetHashPolicy()) > 0 || ra.GetMetadataMatch() != nil:
		return nil, fmt.Errorf("%s.route: hash policies and metadata matches are not supported", field)
	case len(r.GetRequestHeadersToAdd()) > 0 || len(r.GetResponseHeadersToAdd()) > 0 || len(r.GetRequestHeadersToRemove()) > 0 || len(r.GetResponseHeadersToRemove()) > 0:
		return nil, fmt.Errorf("%s: header manipulation is not supported here; %s", field, headerMutationsSupported)
	}
	if rp := ra.GetRetryPolicy(); rp != nil {
		n, err := parseRetryPolicy(rp, field+".route.retry_policy")
		if err != nil {
			return nil, err
		}
		re.connectRetries = n
		if re.resetRetry, re.retryMethods, err = parseRetryConditions(rp, field+".route.retry_policy"); err != nil {
			return nil, err
		}
	}
	pr, tc, err := parsePerFilter(r.GetTypedPerFilterConfig(), field+".typed_per_filter_config")
	if err != nil {
		return nil, err
	}
	re.rbac, re.transcoder = pr, tc
	return re, nil
}

// parseRetryPolicy accepts the one retry policy the built-in data plane carries out: connection
// failures retried on another endpoint (previous_hosts), nothing else; it returns num_retries.
func parseRetryPolicy(rp *route.RetryPolicy, field string) (int, error) {
	for _, on := range strings.Split(rp.GetRetryOn(), ",") {
		if on = strings.TrimSpace(on); on != "connect-failure" && on != "reset" {
			return 0, fmt.Errorf("%s.retry_on: %q is not supported; the built-in data plane retries connect-failure and reset only", field, on)
		}
	}
	n := 1 // Envoy's default num_retries
	if v := rp.GetNumRetries(); v != nil {
		n = int(v.GetValue())
	}
	for i, p := range rp.GetRetryHostPredicate() {
		if p.GetName() != "envoy.retry_host_predicates.previous_hosts" {
			return 0, fmt.Errorf("%s.retry_host_predicate[%d]: %s is not supported; use envoy.retry_host_predicates.previous_hosts", field, i, p.GetName())
		}
	}
	if rp.GetPerTryTimeout() != nil || rp.GetRetryBackOff() != nil || len(rp.GetRetriableStatusCodes()) > 0 || len(rp.GetRetriableHeaders()) > 0 || rp.GetRetryPriority() != nil {
		return 0, fmt.Errorf("%s: only retry_on, num_retries, retry_host_predicate, retriable_request_headers (:method) and host_selection_retry_max_attempts are supported", field)
	}
	return n, nil
}

// parseRetryConditions reads retry_on's reset and a retriable_request_headers condition on
// :method (all of them must match for a request to be retried, as in Envoy).
func parseRetryConditions(rp *route.RetryPolicy, field string) (bool, func(string) bool, error) {
	reset := slices.Contains(strings.Split(strings.ReplaceAll(rp.GetRetryOn(), " ", ""), ","), "reset")
	var ms []func(string) bool
	for i, h := range rp.GetRetriableRequestHeaders() {
		f := fmt.Sprintf("%s.retriable_request_headers[%d]", field, i)
		if h.GetName() != ":method" || h.GetInvertMatch() || h.GetStringMatch() == nil {
			return false, nil, fmt.Errorf("%s: only a string_match on :method is supported", f)
		}
		m, err := stringMatcher(h.GetStringMatch())
		if err != nil {
			return false, nil, fmt.Errorf("%s.string_match: %v", f, err)
		}
		ms = append(ms, m)
	}
	if len(ms) == 0 {
		return reset, nil, nil
	}
	return reset, func(method string) bool {
		for _, m := range ms {
			if !m(method) {
				return false
			}
		}
		return true
	}, nil
}

// ---- clusters ----

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
	sni         string
	alpn        []string
	certSecret  string           // SDS name of the client certificate, or
	inlineCert  *tls.Certificate // an inline one (or none)
	rootsSecret string           // SDS name of the trust bundle, or
	inlineRoots *x509.CertPool
	sans        []sanMatcher
	minVersion  uint16
	maxVersion  uint16
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
	//nolint:staticcheck // the deprecated field still selects HTTP/2 in Envoy
	if c.GetHttp2ProtocolOptions() != nil {
		cfg.http2 = true
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
	cfg.outlier = parseOutlier(c.GetOutlierDetection())
	if od := c.GetOutlierDetection(); od != nil {
		if od.GetEnforcingFailurePercentage().GetValue() > 0 || od.GetEnforcingFailurePercentageLocalOrigin().GetValue() > 0 {
			return nil, fail("outlier_detection: failure percentage ejection is not supported; use consecutive_5xx / consecutive_gateway_failure")
		}
		if od.GetSplitExternalLocalOriginErrors() {
			return nil, fail("outlier_detection.split_external_local_origin_errors: not supported")
		}
		if od.GetMaxEjectionPercent().GetValue() > 100 {
			return nil, fail("outlier_detection.max_ejection_percent: %d is over 100", od.GetMaxEjectionPercent().GetValue())
		}
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
		return false, nil
	default:
		return false, fmt.Errorf("%s: %T is not supported; use explicit_http_config", field, o.GetUpstreamProtocolOptions())
	}
}

func parseOutlier(od *clusterpb.OutlierDetection) *outlierSpec {
	if od == nil {
		return nil
	}
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
	s := &tlsSpec{sni: u.GetSni(), minVersion: tls.VersionTLS12, maxVersion: tls.VersionTLS13}
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
	case len(ctx.GetTlsCertificateSdsSecretConfigs()) > 1 || len(ctx.GetTlsCertificates()) > 1:
		return nil, errors.New("common_tls_context: only one client certificate is supported")
	case len(ctx.GetTlsCertificateSdsSecretConfigs()) == 1:
		sc := ctx.GetTlsCertificateSdsSecretConfigs()[0]
		if err := checkSDS(sc, "common_tls_context.tls_certificate_sds_secret_configs[0]"); err != nil {
			return nil, err
		}
		s.certSecret = sc.GetName()
	case len(ctx.GetTlsCertificates()) == 1:
		c, err := parseTLSCertificate(ctx.GetTlsCertificates()[0])
		if err != nil {
			return nil, fmt.Errorf("common_tls_context.tls_certificates[0]: %v", err)
		}
		s.inlineCert = c
	}
	if ctx.GetTlsCertificateProviderInstance() != nil || ctx.GetCustomHandshaker() != nil {
		return nil, errors.New("common_tls_context: certificate providers and custom handshakers are not supported; use SDS")
	}
	var vc *tlsv3.CertificateValidationContext
	switch v := ctx.GetValidationContextType().(type) {
	case *tlsv3.CommonTlsContext_ValidationContext:
		vc = v.ValidationContext
	case *tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig:
		if err := checkSDS(v.ValidationContextSdsSecretConfig, "common_tls_context.validation_context_sds_secret_config"); err != nil {
			return nil, err
		}
		s.rootsSecret = v.ValidationContextSdsSecretConfig.GetName()
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
		return nil, fmt.Errorf("common_tls_context: validation context %T is not supported", v)
	}
	if vc != nil {
		if vc.GetTrustedCa() != nil {
			pem, err := readDataSource(vc.GetTrustedCa())
			if err != nil {
				return nil, fmt.Errorf("validation context trusted_ca: %v", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, errors.New("validation context trusted_ca: no PEM certificate found")
			}
			if s.rootsSecret != "" {
				return nil, errors.New("validation context: trusted_ca and an SDS trust bundle are both set; set one")
			}
			s.inlineRoots = pool
		}
		if len(vc.GetMatchSubjectAltNames()) > 0 { //nolint:staticcheck // rejected, not used
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
	if s.rootsSecret == "" && s.inlineRoots == nil {
		return nil, errors.New("validation context: a trust bundle (trusted_ca or an SDS secret) is required")
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

func stringMatcher(m *matcher.StringMatcher) (func(string) bool, error) {
	fold := func(s string) string { return s }
	if m.GetIgnoreCase() {
		fold = strings.ToLower
	}
	switch p := m.GetMatchPattern().(type) {
	case *matcher.StringMatcher_Exact:
		want := fold(p.Exact)
		return func(s string) bool { return fold(s) == want }, nil
	case *matcher.StringMatcher_Prefix:
		want := fold(p.Prefix)
		return func(s string) bool { return strings.HasPrefix(fold(s), want) }, nil
	case *matcher.StringMatcher_Suffix:
		want := fold(p.Suffix)
		return func(s string) bool { return strings.HasSuffix(fold(s), want) }, nil
	case *matcher.StringMatcher_Contains:
		want := fold(p.Contains)
		return func(s string) bool { return strings.Contains(fold(s), want) }, nil
	case *matcher.StringMatcher_SafeRegex:
		re, err := regexp.Compile("^(?:" + p.SafeRegex.GetRegex() + ")$")
		if err != nil {
			return nil, fmt.Errorf("safe_regex: %v", err)
		}
		return re.MatchString, nil
	}
	return nil, fmt.Errorf("%T is not supported", m.GetMatchPattern())
}

func readDataSource(d *core.DataSource) ([]byte, error) {
	switch s := d.GetSpecifier().(type) {
	case *core.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case *core.DataSource_InlineString:
		return []byte(s.InlineString), nil
	case *core.DataSource_Filename:
		b, err := os.ReadFile(s.Filename)
		if err != nil {
			return nil, err
		}
		return b, nil
	case *core.DataSource_EnvironmentVariable:
		v, ok := os.LookupEnv(s.EnvironmentVariable)
		if !ok {
			return nil, fmt.Errorf("environment variable %s is not set", s.EnvironmentVariable)
		}
		return []byte(v), nil
	}
	return nil, errors.New("empty data source")
}

// ---- endpoints ----

func parseCLA(cla *endpoint.ClusterLoadAssignment) ([]endpointSpec, error) {
	var out []endpointSpec
	for i, le := range cla.GetEndpoints() {
		if le.GetPriority() > maxPriority {
			return nil, fmt.Errorf("endpoints[%d].priority: %d is over %d, the most levels this data plane keeps", i, le.GetPriority(), maxPriority)
		}
		if le.GetLedsClusterLocalityConfig() != nil {
			return nil, fmt.Errorf("endpoints[%d]: LEDS is not supported", i)
		}
		for j, lb := range le.GetLbEndpoints() {
			f := fmt.Sprintf("endpoints[%d].lb_endpoints[%d]", i, j)
			ep := lb.GetEndpoint()
			if ep == nil {
				return nil, fmt.Errorf("%s: endpoint is required (named endpoints are not supported)", f)
			}
			sa := ep.GetAddress().GetSocketAddress()
			if sa == nil || sa.GetNamedPort() != "" {
				return nil, fmt.Errorf("%s.endpoint.address: a socket_address with port_value is required", f)
			}
			if net.ParseIP(sa.GetAddress()) == nil {
				return nil, fmt.Errorf("%s.endpoint.address.address: %q is not an IP address", f, sa.GetAddress())
			}
			if sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
				return nil, fmt.Errorf("%s.endpoint.address.port_value: %d is not a port", f, sa.GetPortValue())
			}
			hs := lb.GetHealthStatus()
			out = append(out, endpointSpec{
				addr:     net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))),
				hostname: ep.GetHostname(),
				healthy:  hs == core.HealthStatus_UNKNOWN || hs == core.HealthStatus_HEALTHY || hs == core.HealthStatus_DEGRADED,
				priority: le.GetPriority(),
			})
		}
	}
	return out, nil
}

// ---- secrets ----

type secret struct {
	name  string
	cert  *tls.Certificate // TLS certificate secrets
	roots *x509.CertPool   // validation context secrets
}

func parseSecret(s *tlsv3.Secret) (*secret, error) {
	name := s.GetName()
	if name == "" {
		return nil, errors.New("secret without a name")
	}
	out := &secret{name: name}
	switch t := s.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		c, err := parseTLSCertificate(t.TlsCertificate)
		if err != nil {
			return nil, fmt.Errorf("secret %q: tls_certificate: %v", name, err)
		}
		out.cert = c
	case *tlsv3.Secret_ValidationContext:
		vc := t.ValidationContext
		if len(vc.GetMatchTypedSubjectAltNames()) > 0 || len(vc.GetVerifyCertificateSpki()) > 0 || len(vc.GetVerifyCertificateHash()) > 0 || vc.GetCrl() != nil {
			return nil, fmt.Errorf("secret %q: validation_context: only trusted_ca is supported in a secret", name)
		}
		pem, err := readDataSource(vc.GetTrustedCa())
		if err != nil {
			return nil, fmt.Errorf("secret %q: validation_context.trusted_ca: %v", name, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("secret %q: validation_context.trusted_ca: no PEM certificate found", name)
		}
		out.roots = pool
	default:
		return nil, fmt.Errorf("secret %q: type %T is not supported; use tls_certificate or validation_context", name, s.GetType())
	}
	return out, nil
}

// parseTLSCertificate loads a chain and key. Errors never quote the key material.
func parseTLSCertificate(tc *tlsv3.TlsCertificate) (*tls.Certificate, error) {
	chain, err := readDataSource(tc.GetCertificateChain())
	if err != nil {
		return nil, fmt.Errorf("certificate_chain: %v", err)
	}
	key, err := readDataSource(tc.GetPrivateKey())
	if err != nil {
		return nil, errors.New("private_key: cannot be read")
	}
	if tc.GetPrivateKeyProvider() != nil || tc.GetPassword() != nil || tc.GetPkcs12() != nil {
		return nil, errors.New("private key providers, passwords and PKCS#12 are not supported")
	}
	c, err := tls.X509KeyPair(chain, key)
	if err != nil {
		return nil, errors.New("certificate_chain and private_key do not form a valid key pair (PEM leaf + intermediates, matching PKCS#8/PKCS#1/EC key)")
	}
	return &c, nil
}

package dataplane

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	streamlog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	transcoderpb "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/proto"
)

type listenerConfig struct {
	name  string
	addr  string // host:port to bind
	proto *listener.Listener
	// sources is the filter chain's source_prefix_ranges; nil matches every peer.
	sources *rbacEngine
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
			case cl.GetRuntimeEnabled() != nil:
				return nil, fail("%s.runtime_enabled: not supported; the built-in data plane has no runtime", field)
			}
			cfg.maxConns = int(min(cl.GetMaxConnections().GetValue(), 1<<31))
			cfg.limitDelay = cl.GetDelay().AsDuration()
		case nameNetRBAC:
			// Plain listeners admit clients by filter_chain_match.source_prefix_ranges; network RBAC
			// is emitted on the inbound (mTLS) listener only.
			return nil, fail("%s: network RBAC on a plain listener is not supported by the built-in data plane; match filter_chain_match.source_prefix_ranges", field)
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
			return nil, fail("%s: network filter %s is not supported by the built-in data plane; it supports %s, %s and %s",
				field, fullName(m), nameConnLimit, nameTCPProxy, nameHCM)
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
	// The control plane emits AUTO only: HTTP/1.1 and HTTP/2 with prior knowledge on one port.
	if h.GetCodecType() != hcm.HttpConnectionManager_AUTO {
		return nil, fmt.Errorf("%s.codec_type: %s is not supported by the built-in data plane; use AUTO", field, h.GetCodecType())
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
		return nil, fmt.Errorf("%s.upgrade_configs: not supported", field)
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

// checkADS accepts a config source that points at the ADS stream, as the control plane's all do.
func checkADS(cs *core.ConfigSource, field string) error {
	if cs.GetAds() == nil {
		return fmt.Errorf("%s: only ads is supported by the built-in data plane (it has one ADS stream)", field)
	}
	return nil
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
		default:
			return nil, fmt.Errorf("%s: access logger %s is not supported; use stdout", f, fullName(m))
		}
	}
	return out, nil
}

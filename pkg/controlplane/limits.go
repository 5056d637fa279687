package controlplane

import (
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Envoy's defaults for what one client may send, stated in every listener so that the built-in
// data plane, which enforces only what it is sent, enforces the same.
const (
	// DefaultMaxRequestHeadersKB is Envoy's max_request_headers_kb: a request head (request
	// line, header lines and their line ends) over 60 KiB is answered 431.
	DefaultMaxRequestHeadersKB = 60
	// DefaultMaxHeadersCount is Envoy's max_headers_count: over 100 request headers is answered
	// 431 (HTTP/1) or the stream is reset (HTTP/2).
	DefaultMaxHeadersCount = 100
	// DefaultMaxConnections is fwdproxy's own default for the connections one listener holds at
	// once (Envoy has none): a client opening connections without end must not take the file
	// descriptors the other listeners, the metrics and /ready need.
	DefaultMaxConnections = 10000
)

// ConnectionLimitFilter is Envoy's network filter that closes connections past a count.
const ConnectionLimitFilter = "envoy.filters.network.connection_limit"

// Limits bound what clients may send to the plain listeners. Zero fields take the defaults.
type Limits struct {
	MaxRequestHeadersKB uint32
	MaxHeadersCount     uint32
	// MaxConnections is the number of connections each listener holds at once.
	MaxConnections uint64
}

func orDefault[T uint32 | uint64](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// requestLimits sets the header limits on an HTTP connection manager.
func requestLimits(m *hcm.HttpConnectionManager, l Limits) {
	m.MaxRequestHeadersKb = wrapperspb.UInt32(orDefault(l.MaxRequestHeadersKB, DefaultMaxRequestHeadersKB))
	if m.CommonHttpProtocolOptions == nil {
		m.CommonHttpProtocolOptions = &core.HttpProtocolOptions{}
	}
	m.CommonHttpProtocolOptions.MaxHeadersCount = wrapperspb.UInt32(orDefault(l.MaxHeadersCount, DefaultMaxHeadersCount))
}

// limitConnections puts the connection_limit filter first in each of the listener's filter
// chains: past max_connections, a new connection is closed before any other filter (or an
// upstream connection) sees it. Its stats are connection_limit.outbound_PORT.limited_connections
// (dot-free, like the other stat prefixes: see StatPrefix).
func limitConnections(l *listener.Listener, limits Limits, pk *packer) {
	f := &listener.Filter{
		Name: ConnectionLimitFilter,
		ConfigType: &listener.Filter_TypedConfig{TypedConfig: pk.pack(&connlimit.ConnectionLimit{
			StatPrefix:     StatPrefix(l.GetAddress().GetSocketAddress().GetPortValue()),
			MaxConnections: wrapperspb.UInt64(orDefault(limits.MaxConnections, DefaultMaxConnections)),
		})},
	}
	for _, fc := range l.GetFilterChains() {
		fc.Filters = append([]*listener.Filter{f}, fc.Filters...)
	}
}

package controlplane

import (
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
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
)

// Limits bound what clients may send to the plain listeners. Zero fields take the defaults.
type Limits struct {
	MaxRequestHeadersKB uint32
	MaxHeadersCount     uint32
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

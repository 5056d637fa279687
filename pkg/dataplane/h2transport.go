//lint:file-ignore SA1019 x/net/http2's Transport speaks HTTP/2 with prior knowledge over the connection dialAddr hands it, whatever ALPN settled, as Envoy does for an HTTP/2 cluster; net/http's own HTTP/2 needs ALPN h2 on TLS. This file holds only its construction.

package dataplane

import (
	"context"
	"crypto/tls"
	"net"
	"time"

	"golang.org/x/net/http2"
)

// newH2Transport is an HTTP/2 cluster's transport: every connection comes from dial (TCP, then
// the cluster's TLS unless plain), pinged after 30 s without frames and closed 15 s after an
// unanswered ping.
func newH2Transport(plain bool, dial func(ctx context.Context, addr string) (net.Conn, error)) *http2.Transport {
	return &http2.Transport{
		AllowHTTP:          plain,
		DisableCompression: true,
		ReadIdleTimeout:    30 * time.Second,
		PingTimeout:        15 * time.Second,
		DialTLSContext: func(ctx context.Context, _, addr string, _ *tls.Config) (net.Conn, error) {
			return dial(ctx, addr)
		},
	}
}

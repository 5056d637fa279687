package dataplane

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// rawExchange writes raw to the listener on port, optionally half-closes or closes, and returns
// what comes back until the data plane closes the connection (or 5s pass).
func rawExchange(t *testing.T, port uint32, raw string, then string) string {
	t.Helper()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	switch then {
	case "close":
		// The client goes away before sending all it announced.
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		return ""
	case "half-close":
		_ = c.(*net.TCPConn).CloseWrite()
	}
	b, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, net.ErrClosed) && !isTimeout(err) && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

// upstreamErrors sums fwdproxy_dataplane_upstream_errors_total of a cluster over every reason.
func (e *env) upstreamErrors(cl string) float64 {
	n := 0.0
	for _, r := range []string{reasonConnect, reasonTLS, reasonTimeout, reasonReset, reasonNoHealthy} {
		n += counter(e.t, e.dp.metrics.upstreamErrs.WithLabelValues(cl, r))
	}
	return n
}

// Requests a client botched are answered 400 (or not at all, when the client is gone) and are
// never the gateway's failure: no upstream error is counted and outlier detection, which ejects
// after two consecutive failures here, ejects nothing.
func TestMalformedRequestsAreTheClientsFault(t *testing.T) {
	e := newEnv(t, 0)
	e.outlier = controlplane.Outlier{ConsecutiveErrors: 2, Interval: 50 * time.Millisecond, BaseEjectionTime: time.Minute, MaxEjectionPercent: 100}
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), nil)
	cl := controlplane.ClusterName(port, "", svc.Host)
	head := "POST /upload HTTP/1.1\r\nHost: " + svc.Host + "\r\n"

	for _, c := range []struct {
		name, raw, then, want string
	}{
		{"bad chunk size", head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", "", "HTTP/1.1 400 Bad Request"},
		{"chunk longer than its size", head + "Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", "", "HTTP/1.1 400 Bad Request"},
		{"chunked body cut short", head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhel", "half-close", ""},
		{"body shorter than Content-Length, client gone", head + "Content-Length: 100\r\n\r\nabc", "close", ""},
		{"body shorter than Content-Length, half-closed", head + "Content-Length: 100\r\n\r\nabc", "half-close", ""},
		{"invalid header name", "GET / HTTP/1.1\r\nHost: " + svc.Host + "\r\nBad Header: v\r\n\r\n", "", "HTTP/1.1 400 Bad Request"},
		{"two Content-Lengths", head + "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "", "HTTP/1.1 400 Bad Request"},
	} {
		for range 3 { // more than the two consecutive failures that eject
			got := rawExchange(t, port, c.raw, c.then)
			if !strings.HasPrefix(got, c.want) || (c.want == "" && strings.Contains(got, " 503 ")) {
				t.Errorf("%s: answered %q, want %q", c.name, got, c.want)
				break
			}
			if c.want != "" && !strings.Contains(strings.ToLower(got), "connection: close") {
				t.Errorf("%s: answered %q without closing the connection", c.name, got)
			}
		}
		eventually(t, c.name+": the connections to end", func() bool {
			return counter(t, e.dp.metrics.connActive.WithLabelValues(controlplane.ListenerName("127.0.0.1", port))) == 0
		})
		if n := e.upstreamErrors(cl); n != 0 {
			t.Errorf("%s: %v upstream errors counted against the gateway", c.name, n)
		}
		if n := counter(t, e.dp.metrics.ejections.WithLabelValues(cl)); n != 0 {
			t.Fatalf("%s: the gateway was ejected for the client's fault", c.name)
		}
	}
	name := controlplane.ListenerName("127.0.0.1", port)
	if n := counter(t, e.dp.metrics.downstreamErrs.WithLabelValues(name, downBadRequest)); n != 6 {
		t.Errorf("downstream_errors_total{bad_request} = %v, want the 6 malformed bodies", n)
	}
	if n := counter(t, e.dp.metrics.downstreamErrs.WithLabelValues(name, downClientClosed)); n < 3 {
		t.Errorf("downstream_errors_total{client_closed} = %v", n)
	}
	if got := rawExchange(t, port, head+"Transfer-Encoding: chunked\r\n\r\nzz\r\n", ""); !strings.HasSuffix(got, "\r\n\r\nBad Request") ||
		!strings.Contains(got, "Content-Type: text/plain\r\n") {
		t.Errorf("the 400 is not Envoy's text/plain \"Bad Request\": %q", got)
	}
	if got := e.dp.Status().Clusters[cl]; strings.Contains(got, "ejected") {
		t.Errorf("cluster status %q", got)
	}
	resp := get(t, &http.Client{}, port, svc.Host, "/")
	if b := body(t, resp); resp.StatusCode != http.StatusOK {
		t.Errorf("a good request afterwards: %d %q", resp.StatusCode, b)
	}
}

// stallServer is a mesh-side TCP service for the two ways a connection ends in a reset: after
// "reset\n" it resets the connection at once (an upstream failure); after "flood\n" it writes
// until its peer stops taking the bytes, then gives up after 300ms and resets (what a service
// does to a client that never reads).
func stallServer(t *testing.T, e *env) netip.AddrPort {
	t.Helper()
	leaf, err := e.ca.IssueFor(reviewsID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(leaf.ChainPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				tc := c.(*tls.Conn)
				defer tc.Close()
				line, err := bufio.NewReader(tc).ReadString('\n')
				if err != nil {
					return
				}
				reset := func() { _ = tc.NetConn().(*net.TCPConn).SetLinger(0); tc.NetConn().Close() }
				if line == "reset\n" {
					reset()
					return
				}
				chunk := make([]byte, 64<<10)
				for range 4096 { // at most 256 MB
					_ = tc.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
					if _, err := tc.Write(chunk); err != nil {
						reset()
						return
					}
				}
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// A TCP client that never reads while it keeps sending, until the service gives up on it and
// resets, is the client's fault: no upstream error, no ejection. An upstream that resets a
// connection is an upstream error in the metrics but, as in Envoy's tcp_proxy (which reports
// only connect failures to outlier detection), does not eject the gateway either.
func TestTCPClientThatNeverReadsIsNotTheGatewaysFault(t *testing.T) {
	e := newEnv(t, 0)
	e.outlier = controlplane.Outlier{ConsecutiveErrors: 2, Interval: 50 * time.Millisecond, BaseEjectionTime: time.Minute, MaxEjectionPercent: 100}
	up := stallServer(t, e)
	port := freePort(t)
	svc := reviews(port, catalog.TCP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(up), nil)
	cl := controlplane.ClusterName(port, "", svc.Host)
	name := controlplane.ListenerName("127.0.0.1", port)
	idle := func() bool { return counter(t, e.dp.metrics.connActive.WithLabelValues(name)) == 0 }

	for i := range 3 {
		c := dialTCP(t, port)
		if _, err := io.WriteString(c, "flood\n"); err != nil {
			t.Fatal(err)
		}
		// Keep sending, never read, until the data plane gives up on the connection.
		block := make([]byte, 16<<10)
		for range 16384 { // at most 256 MB
			_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write(block); err != nil {
				break
			}
		}
		c.Close()
		eventually(t, fmt.Sprintf("flood %d: the connection to end", i), idle)
	}
	// The connection is counted once it has ended (the client side closes first).
	eventually(t, "the three stalled clients counted", func() bool {
		return counter(t, e.dp.metrics.downstreamErrs.WithLabelValues(name, downClientStalled)) == 3
	})
	if n := e.upstreamErrors(cl); n != 0 {
		t.Errorf("%v upstream errors counted for clients that did not read", n)
	}

	for i := range 3 {
		c := dialTCP(t, port)
		if _, err := io.WriteString(c, "reset\n"); err != nil {
			t.Fatal(err)
		}
		_, _ = io.ReadAll(c)
		eventually(t, fmt.Sprintf("reset %d: the connection to end", i), idle)
	}
	eventually(t, "the three upstream resets counted", func() bool {
		return counter(t, e.dp.metrics.upstreamErrs.WithLabelValues(cl, reasonReset)) == 3
	})
	if n := counter(t, e.dp.metrics.ejections.WithLabelValues(cl)); n != 0 {
		t.Errorf("the gateway was ejected %v times", n)
	}
}

// An HTTP client that never reads its response, until the service gives up on the stalled
// response and resets, is not the gateway's failure either.
func TestHTTPClientThatNeverReadsIsNotTheGatewaysFault(t *testing.T) {
	e := newEnv(t, 0)
	e.outlier = controlplane.Outlier{ConsecutiveErrors: 2, Interval: 50 * time.Millisecond, BaseEjectionTime: time.Minute, MaxEjectionPercent: 100}
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), nil)
	cl := controlplane.ClusterName(port, "", svc.Host)
	name := controlplane.ListenerName("127.0.0.1", port)
	for i := range 3 {
		c := dialTCP(t, port)
		_ = c.SetReadBuffer(4 << 10) // stall sooner
		if _, err := io.WriteString(c, "GET /flood HTTP/1.1\r\nHost: "+svc.Host+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		eventually(t, fmt.Sprintf("flood %d: the service to give up on the response", i), func() bool { return mesh.floodsAbandoned.Load() == int64(i+1) })
		c.Close()
		eventually(t, fmt.Sprintf("flood %d: the connection to end", i), func() bool {
			return counter(t, e.dp.metrics.connActive.WithLabelValues(name)) == 0
		})
	}
	if n := e.upstreamErrors(cl); n != 0 {
		t.Errorf("%v upstream errors counted for clients that did not read", n)
	}
	if n := counter(t, e.dp.metrics.ejections.WithLabelValues(cl)); n != 0 {
		t.Errorf("the gateway was ejected %v times", n)
	}
	resp := get(t, &http.Client{}, port, svc.Host, "/")
	if b := body(t, resp); resp.StatusCode != http.StatusOK {
		t.Errorf("a good request afterwards: %d %q", resp.StatusCode, b)
	}
}

// headRequest is a GET whose request head (request line, header lines, blank line: what Envoy
// counts against max_request_headers_kb) is exactly size bytes, with n headers in all (Host
// included).
func headRequest(host string, size, n int) string {
	var b strings.Builder
	b.WriteString("GET / HTTP/1.1\r\nHost: " + host + "\r\n")
	for i := 1; i < n-1; i++ {
		fmt.Fprintf(&b, "X-H%d: v\r\n", i)
	}
	// The last header pads the head to size.
	pad := size - b.Len() - len("X-Pad: \r\n\r\n")
	if n == 1 || pad < 0 {
		panic("headRequest: too small")
	}
	b.WriteString("X-Pad: " + strings.Repeat("p", pad) + "\r\n\r\n")
	return b.String()
}

// Request headers over Envoy's limits (max_request_headers_kb, default 60; max_headers_count,
// default 100), which translation sets on every HTTP listener, are answered 431 as Envoy answers
// them and never forwarded; limits configured otherwise are enforced as configured.
func TestRequestHeaderLimits(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	opts := e.options(mesh.addr)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, opts, nil)
	name := controlplane.ListenerName("127.0.0.1", port)
	const ok, tooLarge, goTooLarge = 200, 431, -431 // goTooLarge: Go's own 431, not Envoy's text
	check := func(what, raw string, want int) {
		t.Helper()
		before := mesh.handshakes()
		c := dialTCP(t, port)
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		resp, err := http.ReadResponse(c.r, nil)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		b := body(t, resp)
		if code := resp.StatusCode; code != want && -code != want {
			t.Errorf("%s: answered %d %.100q, want %d", what, code, b, want)
			return
		}
		if want == tooLarge {
			if b != "Request Header Fields Too Large" || resp.Header.Get("Content-Type") != "text/plain" || !resp.Close {
				t.Errorf("%s: not Envoy's 431: %q %v close=%v", what, b, resp.Header, resp.Close)
			}
		}
		if want != ok && mesh.handshakes() != before {
			t.Errorf("%s: forwarded to the mesh", what)
		}
	}
	check("60 KiB head", headRequest(svc.Host, 60<<10, 50), ok)
	check("60 KiB + 1 head", headRequest(svc.Host, 60<<10+1, 50), tooLarge)
	check("100 headers", headRequest(svc.Host, 4<<10, 100), ok)
	check("101 headers", headRequest(svc.Host, 4<<10, 101), tooLarge)
	// Far over the limit, Go's HTTP server refuses the head before the data plane sees it.
	check("1 MB header", headRequest(svc.Host, 1<<20, 2), goTooLarge)
	check("10,000 headers", headRequest(svc.Host, 200<<10, 10000), goTooLarge)
	if n := counter(t, e.dp.metrics.downstreamErrs.WithLabelValues(name, downHeadersTooLarge)); n != 1 {
		t.Errorf("downstream_errors_total{headers_too_large} = %v", n)
	}
	if n := counter(t, e.dp.metrics.downstreamErrs.WithLabelValues(name, downTooManyHeaders)); n != 1 {
		t.Errorf("downstream_errors_total{too_many_headers} = %v", n)
	}

	// Configured limits replace the defaults, on the listener in place.
	opts.MaxRequestHeadersKB, opts.MaxHeadersCount = 8, 20
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, opts, nil)
	check("8 KiB head", headRequest(svc.Host, 8<<10, 5), ok)
	check("8 KiB + 1 head", headRequest(svc.Host, 8<<10+1, 5), tooLarge)
	check("20 headers", headRequest(svc.Host, 2<<10, 20), ok)
	check("21 headers", headRequest(svc.Host, 2<<10, 21), tooLarge)
	opts.MaxRequestHeadersKB = 96
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, opts, nil)
	check("96 KiB head", headRequest(svc.Host, 96<<10, 5), ok)
	if n := e.upstreamErrors(controlplane.ClusterName(port, "", svc.Host)); n != 0 {
		t.Errorf("%v upstream errors", n)
	}
}

// A listener takes at most its connection_limit filter's max_connections (listen.maxConnections)
// at once: one more is closed at once, counted, and never connects upstream; when one closes,
// the next is taken. The data plane's own cap on all its connections (kept below the process's
// file limit, so the metrics and /ready stay reachable) refuses the same way.
func TestConnectionLimits(t *testing.T) {
	e := newEnvWith(t, 0, func(o *Options) { o.MaxConnections = 5 })
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	web := newMeshServer(t, e.ca, reviewsID, false)
	tcpPort, httpPort := freePort(t), freePort(t)
	db := reviews(tcpPort, catalog.TCP)
	db.Gateways = []string{"tcp"}
	site := catalog.Service{Host: "site.default.svc.cluster.local", Ports: []catalog.Port{{Number: httpPort, Protocol: catalog.HTTP}},
		Identities: []string{reviewsID}, Gateways: []string{"eastwest"}}
	opts := e.options(web.addr)
	opts.Gateways = append(opts.Gateways, controlplane.Gateway{Name: "tcp", Addresses: []netip.AddrPort{mesh.addr}})
	opts.MaxConnections = 3
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{db, site}}, opts, nil)
	tcpName, httpName := controlplane.ListenerName("127.0.0.1", tcpPort), controlplane.ListenerName("127.0.0.1", httpPort)
	refused := func(name, reason string) float64 {
		return counter(t, e.dp.metrics.connRefused.WithLabelValues(name, reason))
	}
	closedAtOnce := func(c *tcpConn) bool {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := c.r.ReadByte()
		return err != nil && !isTimeout(err) && b == 0
	}

	var open []*tcpConn
	for range 3 {
		c := dialTCP(t, tcpPort)
		c.line(t) // greeted by the service: connected upstream
		open = append(open, c)
	}
	accepts := mesh.accepts.Load()
	if c := dialTCP(t, tcpPort); !closedAtOnce(c) {
		t.Fatal("a 4th connection to a listener limited to 3 was not closed")
	}
	if n := refused(tcpName, "limit"); n != 1 {
		t.Errorf("connections_refused_total{limit} = %v", n)
	}
	if mesh.accepts.Load() != accepts {
		t.Error("the refused connection reached the upstream")
	}
	open[0].Close()
	open = open[1:]
	eventually(t, "the closed connection to be let go", func() bool {
		return counter(t, e.dp.metrics.connActive.WithLabelValues(tcpName)) == 2
	})
	c := dialTCP(t, tcpPort)
	c.line(t)
	open = append(open, c)

	// The HTTP listener has its own limit of 3; the data plane's cap of 5 is reached first.
	for range 2 {
		c := dialTCP(t, httpPort)
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: site.default.svc.cluster.local\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(c.r, nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("HTTP within the limits: %v %v", resp, err)
		}
		body(t, resp)
		open = append(open, c)
	}
	if c := dialTCP(t, httpPort); !closedAtOnce(c) {
		t.Fatal("a 6th connection to a data plane capped at 5 was not closed")
	}
	if n := refused(httpName, "overload"); n != 1 {
		t.Errorf("connections_refused_total{overload} = %v", n)
	}
	for _, c := range open {
		c.Close()
	}
}

// The data plane's cap on all connections, by default, leaves room under the file limit for
// every connection's upstream, the listeners and the daemon's own sockets.
func TestConnectionCapFollowsTheFileLimit(t *testing.T) {
	dp := New(Options{})
	dp.fileLimit = 1024
	dp.listenerCount.Store(1)
	if got := dp.connectionCap(); got != (1024-fdReserve-1)/2 {
		t.Errorf("cap with a file limit of 1024 and one listener: %d", got)
	}
	dp.listenerCount.Store(2000)
	if got := dp.connectionCap(); got != 1 {
		t.Errorf("cap with more listeners than the limit allows: %d, want 1", got)
	}
	if got := New(Options{MaxConnections: -1}).connectionCap(); got != 0 {
		t.Errorf("MaxConnections -1: cap %d, want none", got)
	}
	if got := New(Options{MaxConnections: 7}).connectionCap(); got != 7 {
		t.Errorf("MaxConnections 7: cap %d", got)
	}
}

package meshtest

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Target is what an Istio SNI names: a service FQDN, a port and an optional subset.
type Target struct {
	Host   string
	Port   uint32
	Subset string
}

// SNI renders the target the way Istio's clients do: outbound_.PORT_.SUBSET_.FQDN, so no subset
// gives outbound_.9080_._.FQDN (BuildDNSSrvSubsetKey).
func (t Target) SNI() string {
	return "outbound_." + strconv.Itoa(int(t.Port)) + "_." + t.Subset + "_." + t.Host
}

func (t Target) String() string { return t.SNI() }

// ParseSNI parses outbound_.PORT_.SUBSET_.FQDN, as an AUTO_PASSTHROUGH gateway does.
func ParseSNI(sni string) (Target, error) {
	rest, ok := strings.CutPrefix(sni, "outbound_.")
	if !ok {
		return Target{}, fmt.Errorf("SNI %q is not outbound_.PORT_.SUBSET_.FQDN", sni)
	}
	portStr, rest, ok := strings.Cut(rest, "_.")
	if !ok {
		return Target{}, fmt.Errorf("SNI %q is not outbound_.PORT_.SUBSET_.FQDN", sni)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return Target{}, fmt.Errorf("SNI %q: port %q is not a port number", sni, portStr)
	}
	var t Target
	t.Port = uint32(port)
	if t.Subset, t.Host, ok = strings.Cut(rest, "_."); !ok {
		return Target{}, fmt.Errorf("SNI %q is not outbound_.PORT_.SUBSET_.FQDN", sni)
	}
	if t.Host == "" {
		return Target{}, fmt.Errorf("SNI %q: empty host", sni)
	}
	return t, nil
}

// GatewayStats counts what a gateway did.
type GatewayStats struct {
	Accepted int64 // connections accepted
	Routed   int64 // connections forwarded to a sidecar
	Refused  int64 // connections closed: no ClientHello, bad or unknown SNI, or sidecar down
}

// Gateway is an east-west gateway in AUTO_PASSTHROUGH mode: it reads the TLS ClientHello's SNI
// without terminating TLS and forwards the exact bytes it read, then the rest of the stream, to
// the sidecar registered for the SNI's (FQDN, port, subset). Unknown SNI: the connection is closed.
type Gateway struct {
	ln     net.Listener
	mu     sync.Mutex
	routes map[Target]string
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup

	accepted, routed, refused atomic.Int64
	lastSNI                   atomic.Value // string
}

// StartGateway listens on addr (e.g. "127.0.0.1:0") and serves until Close.
func StartGateway(addr string) (*Gateway, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	g := &Gateway{ln: ln, routes: map[Target]string{}, conns: map[net.Conn]struct{}{}}
	g.wg.Add(1)
	go g.serve()
	return g, nil
}

// Addr is the gateway's listening address, host:port.
func (g *Gateway) Addr() string { return g.ln.Addr().String() }

// Route sends connections for t to the sidecar at backend (host:port).
func (g *Gateway) Route(t Target, backend string) {
	g.mu.Lock()
	g.routes[t] = backend
	g.mu.Unlock()
}

// Unroute removes t's route; new connections for it are closed.
func (g *Gateway) Unroute(t Target) {
	g.mu.Lock()
	delete(g.routes, t)
	g.mu.Unlock()
}

// Stats returns the gateway's counters.
func (g *Gateway) Stats() GatewayStats {
	return GatewayStats{Accepted: g.accepted.Load(), Routed: g.routed.Load(), Refused: g.refused.Load()}
}

// LastSNI is the SNI of the most recent ClientHello seen, "" if none.
func (g *Gateway) LastSNI() string {
	s, _ := g.lastSNI.Load().(string)
	return s
}

// Close stops listening and cuts every connection in flight, like a gateway pod going away.
func (g *Gateway) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	err := g.ln.Close()
	for c := range g.conns {
		c.Close()
	}
	g.mu.Unlock()
	g.wg.Wait()
	return err
}

func (g *Gateway) track(c net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		c.Close()
		return false
	}
	g.conns[c] = struct{}{}
	return true
}

func (g *Gateway) untrack(c net.Conn) {
	g.mu.Lock()
	delete(g.conns, c)
	g.mu.Unlock()
	c.Close()
}

func (g *Gateway) serve() {
	defer g.wg.Done()
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		g.accepted.Add(1)
		if !g.track(c) {
			return
		}
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			defer g.untrack(c)
			g.handle(c)
		}()
	}
}

func (g *Gateway) handle(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	hello, raw, err := PeekClientHello(c)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		g.refused.Add(1)
		return
	}
	g.lastSNI.Store(hello.ServerName)
	t, err := ParseSNI(hello.ServerName)
	if err != nil {
		g.refused.Add(1)
		return
	}
	g.mu.Lock()
	backend, ok := g.routes[t]
	g.mu.Unlock()
	if !ok {
		g.refused.Add(1)
		return
	}
	up, err := net.DialTimeout("tcp", backend, 5*time.Second)
	if err != nil {
		g.refused.Add(1)
		return
	}
	if !g.track(up) {
		return
	}
	defer g.untrack(up)
	if _, err := up.Write(raw); err != nil {
		g.refused.Add(1)
		return
	}
	g.routed.Add(1)
	Splice(c, up)
}

// Splice copies both ways between a and b until both directions end, passing half-closes on.
func Splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			_ = dst.Close()
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
}

// Hello is what a gateway learns from a ClientHello without terminating TLS.
type Hello struct {
	ServerName string
	ALPN       []string
}

// errPeeked stops the handshake once the ClientHello is parsed.
var errPeeked = errors.New("meshtest: ClientHello peeked")

// PeekClientHello reads the client's first TLS flight from c and parses its ClientHello with
// crypto/tls, without answering it. It returns every byte it read from c, to be forwarded
// unchanged.
func PeekClientHello(c net.Conn) (Hello, []byte, error) {
	rec := &recordingConn{Conn: c}
	var hello Hello
	var got bool
	err := tls.Server(rec, &tls.Config{GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		hello = Hello{ServerName: chi.ServerName, ALPN: append([]string(nil), chi.SupportedProtos...)}
		got = true
		return nil, errPeeked
	}}).Handshake()
	if !got {
		if err == nil {
			err = errors.New("no ClientHello")
		}
		return Hello{}, rec.buf.Bytes(), fmt.Errorf("reading ClientHello: %w", err)
	}
	return hello, rec.buf.Bytes(), nil
}

// recordingConn keeps what is read and discards what is written: the TLS server that parses the
// ClientHello must not answer the client.
type recordingConn struct {
	net.Conn
	buf bytes.Buffer
}

func (r *recordingConn) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	r.buf.Write(p[:n])
	return n, err
}

func (r *recordingConn) Write(p []byte) (int, error) { return len(p), nil }

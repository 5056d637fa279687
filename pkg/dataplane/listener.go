package dataplane

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// listenerRT is a bound socket and what serves it. Its config is swapped atomically when the
// listener changes without moving; connections take the config of the moment they arrive, so
// open connections finish with the config they started with.
type listenerRT struct {
	dp   *DataPlane
	addr string
	ln   net.Listener
	cfg  atomic.Pointer[listenerConfig]

	// serving is the HTTP server connections are handed to; it is replaced when the listener's
	// configuration changes what the server itself enforces (idle timeout, header size). It is
	// started on the first HTTP connection: a TCP listener (most of them at fleet scale) never
	// holds a server and its goroutine. servingMu orders starting one with drain.
	serving   atomic.Pointer[httpServing]
	servingMu sync.Mutex
	retired   sync.WaitGroup // servers replaced and still finishing their requests
	mu        sync.Mutex
	conns     map[*trackedConn]struct{}
	closing   atomic.Bool
	loopDone  chan struct{}
}

// httpServing is one http.Server of a listener, with what it was built for.
type httpServing struct {
	srv    *http.Server
	ln     *chanListener
	params serverParams
}

// serverParams are the parts of a listener's configuration that Go's HTTP server enforces
// itself, so that a change needs a new server.
type serverParams struct {
	idle time.Duration
	// maxHeaderBytes is Go's own bound on a request head, a memory guard: Go reads up to 4 KiB
	// more before refusing, and ServeHTTP enforces the exact limit.
	maxHeaderBytes int
}

func paramsOf(cfg *listenerConfig) serverParams {
	p := serverParams{idle: time.Hour, maxHeaderBytes: 60 << 10}
	if hc := cfg.http; hc != nil {
		if hc.idleTimeout > 0 {
			p.idle = hc.idleTimeout
		}
		p.maxHeaderBytes = hc.maxHeadBytes
	}
	return p
}

func (dp *DataPlane) bind(cfg *listenerConfig) (*listenerRT, error) {
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return nil, err
	}
	l := &listenerRT{dp: dp, addr: cfg.addr, ln: ln, conns: map[*trackedConn]struct{}{}, loopDone: make(chan struct{})}
	l.cfg.Store(cfg)
	return l, nil
}

// start serves the socket.
func (l *listenerRT) start() {
	go l.acceptLoop()
}

// currentServing is the HTTP server of the moment, started if there is none yet; nil once the
// listener drains.
func (l *listenerRT) currentServing() *httpServing {
	if s := l.serving.Load(); s != nil {
		return s
	}
	l.servingMu.Lock()
	defer l.servingMu.Unlock()
	if s := l.serving.Load(); s != nil || l.closing.Load() {
		return s
	}
	s := l.newServing(paramsOf(l.cfg.Load()))
	l.serving.Store(s)
	return s
}

func (l *listenerRT) newServing(p serverParams) *httpServing {
	ln := &chanListener{addr: l.ln.Addr(), ch: make(chan net.Conn), done: make(chan struct{})}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // HTTP/2 with prior knowledge (codec AUTO)
	srv := &http.Server{
		Handler:           l,
		Protocols:         protocols,
		ReadHeaderTimeout: time.Minute,
		IdleTimeout:       p.idle,
		MaxHeaderBytes:    p.maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(l.dp.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if tc, ok := c.(*trackedConn); ok && tc.inbound != nil {
				ctx = context.WithValue(ctx, inboundKey{}, tc.inbound)
			}
			a := peerAddr(c)
			return context.WithValue(ctx, peerKey{}, &connPeer{addr: a, str: a.String()})
		},
	}
	go func() { _ = srv.Serve(ln) }()
	return &httpServing{srv: srv, ln: ln, params: p}
}

// reconfigure follows an in-place configuration change: when the HTTP server must enforce
// something else, new connections go to a new server and the old one finishes its requests
// (bounded by the drain time) and closes its idle connections.
func (l *listenerRT) reconfigure(cfg *listenerConfig) {
	p := paramsOf(cfg)
	l.servingMu.Lock()
	defer l.servingMu.Unlock()
	old := l.serving.Load()
	if old == nil || old.params == p || l.closing.Load() {
		return // none started yet: the first HTTP connection starts one for cfg
	}
	l.serving.Store(l.newServing(p))
	l.retired.Go(func() { retire(old, l.dp.opts.DrainTime) })
}

func retire(s *httpServing, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
	_ = s.srv.Close()
}

// handHTTP gives an accepted connection to the current HTTP server.
func (l *listenerRT) handHTTP(tc *trackedConn) {
	for {
		s := l.currentServing()
		if s == nil { // draining
			tc.Close()
			return
		}
		select {
		case s.ln.ch <- tc:
			return
		case <-s.ln.done:
			if l.closing.Load() || l.serving.Load() == s {
				tc.Close()
				return
			}
			// replaced meanwhile: hand it to the new server
		}
	}
}

type peerKey struct{}

// connPeer is a downstream connection's peer address, and as text for X-Forwarded-For, so
// that a request does not format it again.
type connPeer struct {
	addr netip.Addr
	str  string
}

func peerAddr(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

func (l *listenerRT) acceptLoop() {
	defer close(l.loopDone)
	var delay time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off, keep the listener. Every listener
			// fails at once then, so the warning is rate-limited across them.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			if ok, left := l.dp.logLimit.Allow("accept"); ok {
				l.dp.log.Warn("accept failed", "listener", l.cfg.Load().name, "error", err, "retry_in", delay, "not_logged_since_last", left)
			}
			time.Sleep(delay)
			continue
		}
		delay = 0
		cfg := l.cfg.Load()
		if !cfg.sources.allowed(peerAddr(conn)) {
			// No filter chain matches this client's address: Envoy closes the connection before
			// any filter runs, so nothing is sent upstream and no server byte comes back.
			l.dp.metrics.rbacDenied.WithLabelValues(cfg.name).Inc()
			l.dp.log.Debug("connection from a client no filter chain matches", "listener", cfg.name, "peer", conn.RemoteAddr().String())
			conn.Close()
			continue
		}
		// Envoy's order: the global cap at accept, then the chain's connection_limit filter.
		if capN := l.dp.connectionCap(); capN > 0 && l.dp.downstream.Load() >= int64(capN) {
			l.refuse(conn, cfg, "overload", 0)
			continue
		}
		if cfg.maxConns > 0 && l.active() >= cfg.maxConns {
			l.refuse(conn, cfg, "limit", cfg.limitDelay)
			continue
		}
		if cfg.inbound != nil { // TLS first; the SNI chooses what serves it (inbound.go)
			go l.serveInbound(l.track(tls.Server(conn, l.inboundTLS(cfg)), cfg.name), cfg)
			continue
		}
		tc := l.track(conn, cfg.name)
		if cfg.tcp != nil {
			go l.serveTCP(tc, cfg)
			continue
		}
		l.handHTTP(tc)
	}
}

// refuse closes a connection past a limit, after delay (connection_limit's delay, which keeps
// a client from retrying at full speed), without reading from it.
func (l *listenerRT) refuse(conn net.Conn, cfg *listenerConfig, reason string, delay time.Duration) {
	l.dp.metrics.connRefused.WithLabelValues(cfg.name, reason).Inc()
	l.dp.log.Debug("connection refused", "listener", cfg.name, "reason", reason, "peer", conn.RemoteAddr().String())
	if delay > 0 {
		time.AfterFunc(delay, func() { conn.Close() })
		return
	}
	conn.Close()
}

// drain stops accepting, lets open connections finish for up to timeout, then closes them.
func (l *listenerRT) drain(timeout time.Duration) {
	if l.closing.Swap(true) {
		return
	}
	l.ln.Close()
	<-l.loopDone
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	l.servingMu.Lock() // closing is set: no server starts after this
	var srv *http.Server
	if s := l.serving.Load(); s != nil {
		srv = s.srv
		go func() { _ = srv.Shutdown(ctx) }()
	}
	l.servingMu.Unlock()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for l.active() > 0 && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	if srv != nil {
		_ = srv.Close()
	}
	l.mu.Lock()
	left := make([]*trackedConn, 0, len(l.conns))
	for c := range l.conns {
		left = append(left, c)
	}
	l.mu.Unlock()
	if len(left) > 0 {
		l.dp.log.Info("drain time over; closing connections", "listener", l.cfg.Load().name, "connections", len(left))
	}
	for _, c := range left {
		c.Close()
	}
	l.retired.Wait()
}

func (l *listenerRT) active() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

// trackedConn counts a downstream connection and lets drain close it.
type trackedConn struct {
	net.Conn
	l        *listenerRT
	listener string
	once     sync.Once
	// inbound is set on a TLS listener's HTTP connections before they reach the HTTP server.
	inbound *inboundConn
}

func (l *listenerRT) track(c net.Conn, name string) *trackedConn {
	tc := &trackedConn{Conn: c, l: l, listener: name}
	l.mu.Lock()
	l.conns[tc] = struct{}{}
	l.mu.Unlock()
	l.dp.downstream.Add(1)
	l.dp.metrics.connActive.WithLabelValues(name).Inc()
	l.dp.metrics.connTotal.WithLabelValues(name).Inc()
	return tc
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
		c.l.dp.downstream.Add(-1)
		c.l.dp.metrics.connActive.WithLabelValues(c.listener).Dec()
	})
	return err
}

// CloseWrite half-closes the downstream connection.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// chanListener hands accepted HTTP connections to an http.Server.
type chanListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func (c *chanListener) Accept() (net.Conn, error) {
	select {
	case conn := <-c.ch:
		return conn, nil
	case <-c.done:
		return nil, net.ErrClosed
	}
}

func (c *chanListener) Close() error {
	c.once.Do(func() { close(c.done) })
	return nil
}

func (c *chanListener) Addr() net.Addr { return c.addr }

package dataplane

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync"
	"sync/atomic"
	"time"
)

// The HTTP/1.1 fast path: a request without a body (the common GET) is written and its
// response read on the request's own goroutine over a pooled upstream connection. Go's
// http.Transport hands every request to a writer and a reader goroutine per connection; on a
// busy proxy those hand-offs cost more than the proxying itself. Everything else (request
// bodies, Expect, upgrades, trailers) goes through http.Transport as before.

const (
	h1IdleTimeout = 5 * time.Minute // as the http.Transport: idle upstream connections kept this long
	h1MaxIdle     = 1024            // idle connections kept per endpoint
	h1BufferSize  = 4 << 10
)

// h1Disabled sends every request through http.Transport: the A/B benchmark's other side.
var h1Disabled atomic.Bool

// h1Pool holds idle upstream connections per endpoint address for one cluster runtime.
type h1Pool struct {
	mu     sync.Mutex
	idle   map[string][]*h1Conn
	closed bool
}

type h1Conn struct {
	conn      net.Conn
	br        *bufio.Reader
	bw        *bufio.Writer
	read      int64 // bytes read since the current request was written
	idleSince time.Time
}

func (pc *h1Conn) Read(p []byte) (int, error) {
	n, err := pc.conn.Read(p)
	pc.read += int64(n)
	return n, err
}

func newH1Conn(c net.Conn) *h1Conn {
	pc := &h1Conn{conn: c}
	pc.br = bufio.NewReaderSize(pc, h1BufferSize)
	pc.bw = bufio.NewWriterSize(c, h1BufferSize)
	return pc
}

// get takes the most recently used idle connection to addr, closing ones idle too long.
func (p *h1Pool) get(addr string, now time.Time) *h1Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	list := p.idle[addr]
	for len(list) > 0 {
		pc := list[len(list)-1]
		list[len(list)-1] = nil
		list = list[:len(list)-1]
		if now.Sub(pc.idleSince) < h1IdleTimeout {
			p.idle[addr] = list
			return pc
		}
		pc.conn.Close()
	}
	delete(p.idle, addr)
	return nil
}

// put returns a connection whose exchange completed cleanly.
func (p *h1Pool) put(addr string, pc *h1Conn) {
	pc.idleSince = time.Now()
	p.mu.Lock()
	if p.closed || len(p.idle[addr]) >= h1MaxIdle {
		p.mu.Unlock()
		pc.conn.Close()
		return
	}
	if p.idle == nil {
		p.idle = map[string][]*h1Conn{}
	}
	p.idle[addr] = append(p.idle[addr], pc)
	p.mu.Unlock()
}

// prune closes connections idle longer than the idle timeout.
func (p *h1Pool) prune(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for addr, list := range p.idle {
		keep := list[:0]
		for _, pc := range list {
			if now.Sub(pc.idleSince) < h1IdleTimeout {
				keep = append(keep, pc)
			} else {
				pc.conn.Close()
			}
		}
		clear(list[len(keep):])
		if len(keep) == 0 {
			delete(p.idle, addr)
		} else {
			p.idle[addr] = keep
		}
	}
}

// closeIdle closes the idle connections; connections in use are closed when they come back.
func (p *h1Pool) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, list := range p.idle {
		for _, pc := range list {
			pc.conn.Close()
		}
	}
	p.idle = nil
}

// h1FastPath reports whether req can take the fast path.
func h1FastPath(req *http.Request) bool {
	return (req.Body == nil || req.Body == http.NoBody) && req.ContentLength <= 0 &&
		len(req.TransferEncoding) == 0 && len(req.Trailer) == 0 && req.Method != http.MethodConnect &&
		req.Header.Get("Upgrade") == "" && req.Header.Get("Expect") == ""
}

// replayable is http.Transport's rule for resending a request whose connection was found
// closed by the server: methods without side effects, or an idempotency key.
func replayable(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, k1 := req.Header["Idempotency-Key"]
	_, k2 := req.Header["X-Idempotency-Key"]
	return k1 || k2
}

var errUnexpectedSwitch = errors.New("upstream switched protocols without an upgrade request")

// roundTripH1 sends a bodiless request to addr over a pooled connection, or a new one from
// dial. A reused connection the server had closed is replaced once, as http.Transport does.
// The request's context bounds the exchange and the reading of the body: when it ends, the
// connection's deadline passes and the connection is not reused.
func (rt *clusterRuntime) roundTripH1(req *http.Request, addr string, dial func() (net.Conn, error)) (*http.Response, error) {
	ctx := req.Context()
	for attempt := 0; ; attempt++ {
		var pc *h1Conn
		if attempt == 0 {
			pc = rt.pool.get(addr, time.Now())
		}
		reused := pc != nil
		if pc == nil {
			c, err := dial()
			if err != nil {
				return nil, err
			}
			pc = newH1Conn(c)
		}
		stop := context.AfterFunc(ctx, func() { _ = pc.conn.SetDeadline(time.Unix(1, 0)) })
		resp, wrote, err := pc.exchange(ctx, req)
		if err == nil {
			resp.Body = &h1Body{rc: resp.Body, pc: pc, pool: rt.pool, addr: addr, keep: !resp.Close && !req.Close, stop: stop}
			return resp, nil
		}
		stop()
		pc.conn.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if reused && pc.read == 0 && (!wrote || replayable(req)) {
			continue // the server closed the idle connection; nothing was processed
		}
		return nil, err
	}
}

// exchange writes req and reads its response head. wrote reports whether the whole request
// was written.
func (pc *h1Conn) exchange(ctx context.Context, req *http.Request) (resp *http.Response, wrote bool, err error) {
	pc.read = 0
	if err = req.Write(pc.bw); err == nil {
		err = pc.bw.Flush()
	}
	if err != nil {
		return nil, false, err
	}
	trace := httptrace.ContextClientTrace(ctx)
	for {
		resp, err = http.ReadResponse(pc.br, req)
		if err != nil {
			return nil, true, err
		}
		code := resp.StatusCode
		if code == http.StatusSwitchingProtocols {
			return nil, true, errUnexpectedSwitch
		}
		if code < 100 || code > 199 {
			return resp, true, nil
		}
		if trace != nil && trace.Got1xxResponse != nil { // informational: pass on, read on
			if err = trace.Got1xxResponse(code, textproto.MIMEHeader(resp.Header)); err != nil {
				return nil, true, err
			}
		}
	}
}

// h1Body returns the connection to the pool once the body is read to its end, and closes it
// otherwise.
type h1Body struct {
	rc   io.ReadCloser
	pc   *h1Conn
	pool *h1Pool
	addr string
	keep bool
	stop func() bool
	mu   sync.Mutex
	done bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err == io.EOF {
		b.release(true)
	}
	return n, err
}

func (b *h1Body) Close() error {
	b.release(false)
	return nil
}

// release returns the connection to the pool after a body read to its end (and nothing left
// buffered beyond it), and closes it otherwise.
func (b *h1Body) release(eof bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return
	}
	b.done = true
	_ = b.rc.Close()
	if b.stop() && eof && b.keep && b.pc.br.Buffered() == 0 {
		b.pool.put(b.addr, b.pc)
		return
	}
	b.pc.conn.Close()
}

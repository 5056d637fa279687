package dataplane

import (
	"context"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The direct path: a plain HTTP/1.1 request without a body, hop-by-hop headers or a query
// ReverseProxy would re-encode is proxied here instead of by httputil.ReverseProxy, doing what
// ReverseProxy does for such a request (Rewrite mode, as newReverseProxy configures it) without
// its per-request copies: the request goes upstream with the request's own settled header map
// (ReverseProxy clones it) and a copy of its URL, the response headers are moved rather than
// appended one value at a time. Anything else still goes through ReverseProxy.

// directDisabled sends every request through ReverseProxy: the A/B benchmark's other side.
var directDisabled atomic.Bool

func init() {
	// An operator's escape hatch, read once: FWDPROXY_DIRECT_PATH=off.
	if os.Getenv("FWDPROXY_DIRECT_PATH") == "off" {
		directDisabled.Store(true)
	}
}

// hopHeaders are ReverseProxy's hop-by-hop headers; a request carrying any of them goes through
// ReverseProxy, which removes them (and those Connection names) from a copy.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// directEligible reports whether ReverseProxy would send r upstream with r's own headers, URL
// and no body: the direct path does the same without the copies.
func directEligible(r *http.Request) bool {
	if r.ProtoMajor != 1 || !h1FastPath(r) {
		return false
	}
	for _, k := range hopHeaders {
		if _, ok := r.Header[k]; ok {
			return false
		}
	}
	return !queryNeedsCleaning(r.URL.RawQuery)
}

// queryNeedsCleaning: ReverseProxy re-encodes a query with a ';', a bad escape or more than
// 10,000 parameters (its cleanQueryParams).
func queryNeedsCleaning(s string) bool {
	if s == "" {
		return false
	}
	if strings.Count(s, "&") >= 10000 {
		return true
	}
	for i := 0; i < len(s); {
		switch s[i] {
		case ';':
			return true
		case '%':
			if i+2 >= len(s) || !ishex(s[i+1]) || !ishex(s[i+2]) {
				return true
			}
			i += 3
		default:
			i++
		}
	}
	return false
}

func ishex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// serveDirect proxies r, routed and settled by ServeHTTP, when it is eligible; it reports
// whether it did. ctx is the request's context carrying info and the route timeout.
func (dp *DataPlane) serveDirect(rw http.ResponseWriter, r *http.Request, info *proxyInfo, ctx context.Context) bool {
	if directDisabled.Load() || !directEligible(r) {
		return false
	}
	// ReverseProxy forwards 1xx responses as they come (Got1xxResponse), never after RoundTrip
	// returned.
	var mu sync.Mutex
	done := false
	trace := &httptrace.ClientTrace{
		Got1xxResponse: func(code int, header textproto.MIMEHeader) error {
			mu.Lock()
			defer mu.Unlock()
			if done {
				return nil
			}
			h := rw.Header()
			copyHeaderValues(h, http.Header(header))
			rw.WriteHeader(code)
			clear(h)
			return nil
		},
	}
	out := r.WithContext(httptrace.WithClientTrace(ctx, trace))
	u := *r.URL
	out.URL = &u
	out.URL.Scheme = "http"
	out.URL.Host = info.cluster.name // the endpoint is chosen in RoundTrip
	out.Body = nil
	out.Close = false
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header.Set("User-Agent", "") // not Go's default User-Agent, as ReverseProxy
	}
	res, err := info.cluster.RoundTrip(out)
	mu.Lock()
	done = true
	mu.Unlock()
	if err != nil {
		dp.proxyError(rw, out, err)
		return true
	}
	if res.StatusCode == http.StatusSwitchingProtocols { // as ReverseProxy: nothing was asked for
		res.Body.Close()
		dp.proxyError(rw, out, fmt.Errorf("backend tried to switch protocol %q when %q was requested", res.Header.Get("Upgrade"), ""))
		return true
	}
	removeHopByHop(res.Header)
	for _, k := range info.respRemove {
		delete(res.Header, k) // canonical names
	}
	moveHeader(rw.Header(), res.Header)
	announced := len(res.Trailer)
	if announced > 0 {
		keys := make([]string, 0, len(res.Trailer))
		for k := range res.Trailer {
			keys = append(keys, k)
		}
		rw.Header().Add("Trailer", strings.Join(keys, ", "))
	}
	rw.WriteHeader(res.StatusCode)
	if err := dp.copyDirect(rw, res); err != nil {
		defer res.Body.Close()
		panic(http.ErrAbortHandler) // as ReverseProxy: the response is cut, the connection reset
	}
	res.Body.Close() // now, to populate res.Trailer
	if len(res.Trailer) > 0 {
		_ = http.NewResponseController(rw).Flush() // chunked, so that the trailers go out
	}
	if len(res.Trailer) == announced {
		copyHeaderValues(rw.Header(), res.Trailer)
		return true
	}
	for k, vv := range res.Trailer {
		k = http.TrailerPrefix + k
		for _, v := range vv {
			rw.Header().Add(k, v)
		}
	}
	return true
}

// copyDirect copies the response body as ReverseProxy does: flushed after every write for a
// stream (Server-Sent Events or no Content-Length), buffered otherwise.
func (dp *DataPlane) copyDirect(rw http.ResponseWriter, res *http.Response) error {
	var w io.Writer = rw
	if streaming(res) {
		mlw := &flushWriter{dst: rw, flush: http.NewResponseController(rw).Flush, flushPending: true}
		defer mlw.stop()
		// As ReverseProxy: the headers go out at once even if the body is slow to come.
		mlw.t = time.AfterFunc(-1, mlw.delayedFlush)
		w = mlw
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		nr, rerr := res.Body.Read(buf)
		if rerr != nil && rerr != io.EOF && rerr != context.Canceled {
			dp.log.Debug("httputil: ReverseProxy read error during body copy: " + rerr.Error())
		}
		if nr > 0 {
			nw, werr := w.Write(buf[:nr])
			if werr != nil {
				return werr
			}
			if nr != nw {
				return io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return nil
			}
			return rerr
		}
	}
}

// streaming is ReverseProxy's flushInterval rule: flush at once for text/event-stream or an
// unknown length. The media type is parsed only when it can be the event stream.
func streaming(res *http.Response) bool {
	if res.ContentLength == -1 {
		return true
	}
	ct := res.Header.Get("Content-Type")
	if !strings.Contains(strings.ToLower(ct), "event-stream") {
		return false
	}
	base, _, _ := mime.ParseMediaType(ct)
	return base == "text/event-stream"
}

// flushWriter is ReverseProxy's maxLatencyWriter with a negative latency: every write flushed.
type flushWriter struct {
	dst          io.Writer
	flush        func() error
	mu           sync.Mutex
	t            *time.Timer
	flushPending bool
}

func (m *flushWriter) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, err := m.dst.Write(p)
	_ = m.flush()
	return n, err
}

func (m *flushWriter) delayedFlush() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.flushPending {
		return
	}
	_ = m.flush()
	m.flushPending = false
}

func (m *flushWriter) stop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushPending = false
	if m.t != nil {
		m.t.Stop()
	}
}

// removeHopByHop is ReverseProxy's removeHopByHopHeaders.
func removeHopByHop(h http.Header) {
	for _, f := range h["Connection"] {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = textproto.TrimString(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	for _, f := range hopHeaders {
		delete(h, f)
	}
}

// copyHeaderValues is ReverseProxy's copyHeader.
func copyHeaderValues(dst, src http.Header) {
	for k, vv := range src {
		for _, v := range vv {
			dst.Add(k, v)
		}
	}
}

// moveHeader is copyHeaderValues for a src that is not used again: a name dst does not hold
// takes src's values as they are.
func moveHeader(dst, src http.Header) {
	for k, vv := range src {
		if len(vv) == 0 {
			continue
		}
		if _, ok := dst[k]; !ok && textproto.CanonicalMIMEHeaderKey(k) == k {
			dst[k] = vv[:len(vv):len(vv)] // an append to dst copies rather than writes into src
			continue
		}
		for _, v := range vv {
			dst.Add(k, v)
		}
	}
}

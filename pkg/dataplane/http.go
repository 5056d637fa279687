package dataplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// proxyInfo travels with a proxied request from the listener to the upstream and back: it is
// the request's context from ServeHTTP on (Value answers proxyKey with it), one allocation and
// one link of the context chain fewer per request than a context.WithValue.
type proxyInfo struct {
	context.Context
	listener string
	cluster  *cluster
	cfg      *httpConfig
	body     *downstreamBody // the request body, when there is one
	retries  int             // connect failures retried on another endpoint (the route's retry policy)
	// resetRetry: a reset before the response is retried too (retry_on reset).
	resetRetry bool
	upstream   string // endpoint used, for the access log
	flags      string // Envoy-style response flags, "-" when none
	// respRemove are the route configuration's response_headers_to_remove.
	respRemove []string
}

type proxyKey struct{}

func (i *proxyInfo) Value(key any) any {
	if key == (proxyKey{}) {
		return i
	}
	return i.Context.Value(key)
}

// ServeHTTP routes a request by Host, applies RBAC and proxies it to the route's cluster.
func (l *listenerRT) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	cfg := l.cfg.Load()
	ic := inboundOf(r) // a mesh caller on the inbound mTLS listener (inbound.go)
	if ic != nil {
		cfg = ic.chain.cfg
	}
	rec := &recorder{ResponseWriter: w}
	info := &proxyInfo{listener: cfg.name, flags: "-"}
	clusterName := ""
	var c *cluster
	defer func() {
		if cfg.http != nil && len(cfg.http.logs) > 0 {
			line := httpLogLine(start, r, rec, info)
			for _, lg := range cfg.http.logs {
				lg.write(line)
			}
		}
		if ic != nil {
			l.dp.metrics.reverseRequests.WithLabelValues(ic.chain.service, ic.label, strconv.Itoa(rec.code())).Inc()
			for _, lg := range ic.chain.logs {
				lg.write(inboundLogLine(start, ic, r.Method+" "+r.URL.Path+" "+r.Proto, rec.code(), info.flags, clusterName))
			}
		}
		switch {
		case c != nil:
			c.requestCounter(rec.code()).Inc()
		case clusterName != "":
			l.dp.metrics.requests.WithLabelValues(clusterName, strconv.Itoa(rec.code())).Inc()
		}
	}()
	hc := cfg.http
	if hc == nil { // the listener became a TCP proxy; this connection predates the change
		info.flags = "NR"
		localReply(rec, http.StatusServiceUnavailable, "listener reconfigured")
		return
	}
	if reason := hc.checkHead(r); reason != "" {
		// As Envoy's codec refuses such a request: 431, the connection closed, nothing routed.
		l.dp.metrics.downstreamErrs.WithLabelValues(cfg.name, reason).Inc()
		info.flags = "DPE"
		rec.Header().Set("Connection", "close")
		localReply(rec, http.StatusRequestHeaderFieldsTooLarge, "Request Header Fields Too Large")
		return
	}
	table := hc.inline
	if table == nil {
		table = l.dp.routeTable(hc.routeName)
	}
	// Like Envoy's connection manager, settle what the client may tell the service before
	// routing, so the access log and every reply see the same request (headers.go).
	var peer netip.Addr
	peerStr := ""
	if cp, ok := r.Context().Value(peerKey{}).(*connPeer); ok {
		peer, peerStr = cp.addr, cp.str
	}
	var internalOnly []string
	if table != nil {
		internalOnly = table.internalOnly
	}
	hc.headers.sanitize(r.Header, peer, peerStr, internalOnly)
	pid := peerID{addr: peer}
	if ic != nil {
		pid = ic.peer
		if ic.xfcc != "" { // SANITIZE_SET: what the caller sent went in sanitize
			r.Header.Set(hdrXFCCName, ic.xfcc)
		}
	}
	var vh *virtualHost
	var re *routeEntry
	if table != nil {
		if vh = table.lookup(r.Host); vh != nil {
			re = vh.match(r.URL.Path)
		}
	}
	if re == nil { // Envoy answers an unknown host or path with an empty 404
		info.flags = "NR"
		rec.WriteHeader(http.StatusNotFound)
		return
	}
	clusterName = re.cluster
	if r.ProtoMajor == 1 && r.ProtoMinor == 0 && !strings.EqualFold(r.Header.Get("Connection"), "keep-alive") {
		rec.Header().Set("Connection", "close") // as Envoy says it to an HTTP/1.0 client
	}
	if hc.rbac != nil {
		eng := hc.rbac.engine
		pr := re.rbac
		if pr == nil {
			pr = vh.rbac
		}
		if pr != nil {
			eng = pr.engine
		}
		if !eng.allowedPeer(pid) {
			l.dp.metrics.rbacDenied.WithLabelValues(cfg.name).Inc()
			info.flags = "RBAC"
			localReply(rec, http.StatusForbidden, "RBAC: access denied")
			return
		}
	}
	c = l.dp.cluster(re.cluster)
	if c == nil {
		l.dp.metrics.upstreamErrs.WithLabelValues(re.cluster, reasonNoHealthy).Inc()
		info.flags = "NC"
		localReply(rec, http.StatusServiceUnavailable, "no healthy upstream")
		return
	}
	info.cluster, info.cfg, info.retries, info.respRemove = c, hc, re.connectRetries, table.responseRemove
	info.resetRetry = re.resetRetry
	if re.retryMethods != nil && !re.retryMethods(r.Method) {
		info.retries = 0 // retriable_request_headers: this request is not retried at all
	}
	// The route configuration's request_headers_to_add, as Envoy's router adds them: after the
	// client's copies of internal_only_headers went in sanitize, replacing any left.
	for _, h := range table.requestAdd {
		r.Header[h.name] = []string{h.value}
	}
	if r.Body != nil && r.Body != http.NoBody {
		info.body = &downstreamBody{ReadCloser: r.Body}
		r.Body = info.body
	}
	info.Context = r.Context()
	if re.timeout > 0 {
		var cancel context.CancelFunc
		info.Context, cancel = context.WithTimeoutCause(info.Context, re.timeout, errRouteTimeout)
		defer cancel()
	}
	var ctx context.Context = info
	if tc := transcoderFor(hc, vh, re); tc != nil && l.dp.serveTranscoded(rec, r.WithContext(ctx), tc, info) {
		return
	}
	l.dp.proxy.ServeHTTP(rec, r.WithContext(ctx))
}

// checkHead enforces max_request_headers_kb and max_headers_count, counting as Envoy does: the
// request line and every header line with its line end, and the blank line; Host is a header.
// It returns the downstream error reason, or "" when the head is within both limits.
func (hc *httpConfig) checkHead(r *http.Request) string {
	size := len(r.Method) + 1 + len(r.RequestURI) + 1 + len(r.Proto) + 2 + 2
	count := 0
	if r.Host != "" {
		size += len("Host: ") + len(r.Host) + 2
		count++
	}
	for name, values := range r.Header {
		for _, v := range values {
			size += len(name) + 2 + len(v) + 2
			count++
		}
	}
	switch {
	case count > hc.maxHeaders:
		return downTooManyHeaders
	case size > hc.maxHeadBytes:
		return downHeadersTooLarge
	}
	return ""
}

func (dp *DataPlane) newReverseProxy() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			info := pr.In.Context().Value(proxyKey{}).(*proxyInfo)
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = info.cluster.name // the endpoint is chosen in RoundTrip
			pr.Out.Host = pr.In.Host
			// Rewrite starts without these; the request's own, settled in ServeHTTP, go upstream.
			for _, k := range goStripped {
				if v := pr.In.Header[k]; len(v) > 0 { // canonical names
					pr.Out.Header[k] = v
				}
			}
		},
		// The route configuration's response_headers_to_remove (http.ReadResponse and the HTTP/2
		// transport give every response its request).
		ModifyResponse: func(resp *http.Response) error {
			if info, ok := resp.Request.Context().Value(proxyKey{}).(*proxyInfo); ok {
				for _, k := range info.respRemove {
					delete(resp.Header, k) // canonical names
				}
			}
			return nil
		},
		Transport: roundTripperFunc(func(r *http.Request) (*http.Response, error) {
			return r.Context().Value(proxyKey{}).(*proxyInfo).cluster.RoundTrip(r)
		}),
		ErrorHandler: dp.proxyError,
		BufferPool:   bufferPool{},
		ErrorLog:     slog.NewLogLogger(dp.log.Handler(), slog.LevelDebug),
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// proxyError answers a failed upstream exchange the way Envoy does: 503 for connection
// failures and no endpoints, 504 for a route timeout.
func (dp *DataPlane) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	info := r.Context().Value(proxyKey{}).(*proxyInfo)
	var ue *upstreamError
	errors.As(err, &ue)
	var de *downstreamError
	switch {
	case errors.As(err, &de):
		// The client's fault, answered as Envoy answers a downstream protocol error (400, and
		// the connection closed, since the rest of the request cannot be found) or not at all
		// when the client went away.
		reason := de.reason()
		dp.metrics.downstreamErrs.WithLabelValues(info.listener, reason).Inc()
		if reason == downClientClosed {
			info.flags = "DC"
			w.WriteHeader(499)
		} else {
			info.flags = "DPE"
			w.Header().Set("Connection", "close")
			localReply(w, http.StatusBadRequest, "Bad Request")
		}
	case ue != nil && ue.reason == reasonNoHealthy:
		info.flags = "UH"
		localReply(w, http.StatusServiceUnavailable, "no healthy upstream")
	case ue != nil && ue.reason == reasonTimeout && ue.addr == "":
		info.flags = "UT"
		localReply(w, http.StatusGatewayTimeout, "upstream request timeout")
	case ue != nil && ue.connectFailure():
		info.flags = "UF"
		// What failed (gateway address, certificate names) goes to the log, not to the client.
		localReply(w, http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: connection failure")
	case r.Context().Err() != nil && ue == nil:
		info.flags = "DC" // the client went away
		dp.metrics.downstreamErrs.WithLabelValues(info.listener, downClientClosed).Inc()
		w.WriteHeader(499)
	default:
		info.flags = "UC"
		localReply(w, http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: connection termination")
	}
	dp.log.Debug("upstream request failed", "cluster", info.cluster.name, "host", r.Host, "error", err)
}

// localReply answers from the data plane itself as Envoy does: text/plain, the body, no detail
// of the upstream.
func localReply(w http.ResponseWriter, code int, body string) {
	h := w.Header()
	h.Del("Content-Length")
	h.Set("Content-Type", "text/plain")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	_, _ = io.WriteString(w, body)
}

// requestID is a random (version 4) UUID, formatted into one allocation.
func requestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// recorder notes the status and bytes written; Unwrap keeps flushing and hijacking working.
type recorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 && code >= 200 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) code() int {
	if r.status == 0 {
		return http.StatusOK
	}
	return r.status
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32*1024); return &b }}

type bufferPool struct{}

func (bufferPool) Get() []byte  { return *bufPool.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { bufPool.Put(&b) }

package dataplane

// A measurement prototype, not a product path: a downstream HTTP/1.1 keep-alive loop that
// serves plain-HTTP connections without Go's http.Server (no background read per request, no
// per-connection server state), to find out what such a loop would gain before building one
// that behaves exactly as the server does. Enabled only by FWDPROXY_H1SERVER=on.

import (
	"bufio"
	"context"
	"net/http"
	"os"
	"strconv"
	"time"
)

var h1ServerOn = os.Getenv("FWDPROXY_H1SERVER") == "on"

// serveH1 runs the loop on tc until the client closes or asks to.
func (l *listenerRT) serveH1(tc *trackedConn) {
	defer tc.Close()
	br := bufio.NewReaderSize(tc, 4<<10)
	bw := bufio.NewWriterSize(tc, 4<<10)
	base := context.WithValue(context.Background(), peerKey{}, peerAddr(tc))
	if s := l.currentServing(); s != nil {
		base = context.WithValue(base, http.ServerContextKey, s.srv)
	}
	remote := tc.RemoteAddr().String()
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		req.RemoteAddr = remote
		ctx, cancel := context.WithCancel(base)
		w := &h1Writer{bw: bw, header: http.Header{}, req: req}
		ok := func() (ok bool) {
			defer func() {
				if recover() != nil {
					ok = false
				}
			}()
			l.ServeHTTP(w, req.WithContext(ctx))
			return true
		}()
		cancel()
		if !ok || w.finish() != nil || req.Close || w.close {
			return
		}
	}
}

// h1Writer buffers a response until the handler ends (or flushes), then writes it with a
// Content-Length, or chunked when it was flushed first.
type h1Writer struct {
	bw      *bufio.Writer
	header  http.Header
	req     *http.Request
	status  int
	body    []byte
	chunked bool
	close   bool
}

func (w *h1Writer) Header() http.Header { return w.header }

func (w *h1Writer) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
}

func (w *h1Writer) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if w.chunked {
		w.bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
		w.bw.WriteString("\r\n")
		w.bw.Write(p)
		_, err := w.bw.WriteString("\r\n")
		return len(p), err
	}
	w.body = append(w.body, p...)
	return len(p), nil
}

func (w *h1Writer) Flush() {
	if w.chunked {
		_ = w.bw.Flush()
		return
	}
	w.writeHead(-1)
	w.chunked = true
	if len(w.body) > 0 {
		b := w.body
		w.body = nil
		_, _ = w.Write(b)
	}
	_ = w.bw.Flush()
}

func (w *h1Writer) writeHead(length int) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.bw.WriteString("HTTP/1.1 ")
	w.bw.WriteString(strconv.Itoa(w.status))
	w.bw.WriteString(" ")
	w.bw.WriteString(http.StatusText(w.status))
	w.bw.WriteString("\r\n")
	h := w.header
	if h.Get("Connection") == "close" {
		w.close = true
	}
	if length >= 0 {
		h.Set("Content-Length", strconv.Itoa(length))
	} else {
		h.Del("Content-Length")
		h.Set("Transfer-Encoding", "chunked")
	}
	if _, ok := h["Date"]; !ok {
		h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	}
	_ = h.Write(w.bw)
	w.bw.WriteString("\r\n")
}

func (w *h1Writer) finish() error {
	if w.chunked {
		w.bw.WriteString("0\r\n\r\n")
	} else {
		w.writeHead(len(w.body))
		if w.req.Method != http.MethodHead {
			w.bw.Write(w.body)
		}
	}
	return w.bw.Flush()
}

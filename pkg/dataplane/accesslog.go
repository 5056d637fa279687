package dataplane

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// accessLogger writes whole lines to one output, safely from many connections.
type accessLogger struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *accessLogger) write(line []byte) {
	l.mu.Lock()
	_, _ = l.w.Write(line)
	l.mu.Unlock()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// httpLogLine is Envoy's default access log format:
// [START] "METHOD PATH PROTOCOL" CODE FLAGS RX TX DURATION_MS - "XFF" "UA" "REQUEST_ID" "AUTHORITY" "UPSTREAM"
func httpLogLine(start time.Time, r *http.Request, rec *recorder, info *proxyInfo) []byte {
	rx := r.ContentLength
	if rx < 0 {
		rx = 0
	}
	b := make([]byte, 0, 256)
	b = append(b, '[')
	b = start.UTC().AppendFormat(b, "2006-01-02T15:04:05.000Z")
	b = append(b, "] \""...)
	b = append(b, r.Method...)
	b = append(b, ' ')
	b = append(b, r.URL.RequestURI()...)
	b = append(b, ' ')
	b = append(b, r.Proto...)
	b = append(b, "\" "...)
	b = strconv.AppendInt(b, int64(rec.code()), 10)
	b = append(b, ' ')
	b = append(b, info.flags...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, rx, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, rec.bytes, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, time.Since(start).Milliseconds(), 10)
	b = append(b, " - "...)
	b = fmt.Appendf(b, "%q %q %q %q %q\n", dash(r.Header.Get("X-Forwarded-For")), dash(r.Header.Get("User-Agent")),
		dash(r.Header.Get("X-Request-Id")), dash(r.Host), dash(info.upstream))
	return b
}

// tcpLogLine is the same format for a TCP connection.
func tcpLogLine(start time.Time, flags string, rx, tx int64, upstream, cluster string) []byte {
	b := make([]byte, 0, 160)
	b = append(b, '[')
	b = start.UTC().AppendFormat(b, "2006-01-02T15:04:05.000Z")
	b = fmt.Appendf(b, "] \"- - -\" 0 %s %d %d %d - \"-\" \"-\" \"-\" \"-\" %q %s\n",
		flags, rx, tx, time.Since(start).Milliseconds(), dash(upstream), cluster)
	return b
}

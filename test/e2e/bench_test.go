//go:build linux

package e2e_test

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkBuiltinDataPath measures the built-in data plane in front of the Go stand-ins, all on
// this machine: HTTP requests over keep-alive connections (upstream TLS connections pooled) and
// new TCP connections (each a new TLS handshake through the gateway). p50/p99 are per request or
// connection. bench/dataplane.sh compares the same paths with HAProxy and a direct baseline.
func BenchmarkBuiltinDataPath(b *testing.B) {
	e := start(b, goMesh, builtin)
	b.Run("HTTPKeepAlive", func(b *testing.B) {
		var lat latencies
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				t0 := time.Now()
				code, _, err := e.get("", "productpage.bookinfo.svc.cluster.local", e.ports.http, "/")
				if err != nil || code != 200 {
					b.Errorf("status %d, %v", code, err)
					return
				}
				lat.add(time.Since(t0))
			}
		})
		lat.report(b)
	})
	b.Run("TCPNewConnection", func(b *testing.B) {
		var lat latencies
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				t0 := time.Now()
				if _, err := e.tcp(""); err != nil {
					b.Errorf("tcp: %v", err)
					return
				}
				lat.add(time.Since(t0))
			}
		})
		lat.report(b)
	})
}

type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

func (l *latencies) report(b *testing.B) {
	if len(l.d) == 0 {
		return
	}
	slices.Sort(l.d)
	b.ReportMetric(float64(l.d[len(l.d)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(l.d[min(len(l.d)-1, len(l.d)*99/100)].Microseconds())/1000, "p99-ms")
}

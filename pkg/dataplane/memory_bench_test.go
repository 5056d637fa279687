package dataplane

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkMemory10kServices reports the data plane's memory at 10,000 services x 2 ports
// (10,001 listeners bound, 20,000 clusters), then with 2,000 idle keep-alive client connections
// on its HTTP listener, each after one request: RSS and Go heap in use (after a GC), and what
// one idle connection adds. Run it alone, once (it binds 10,001 sockets and holds 4,000 more):
//
//	go test -run '^$' -bench Memory10k -benchtime 1x ./pkg/dataplane/
func BenchmarkMemory10kServices(b *testing.B) {
	const idle = 2000
	for b.Loop() {
		rss0, heap0 := memNow(b)
		dp := New(Options{DrainTime: time.Millisecond, MaxConnections: -1})
		res := scaleResources(b, 10000)
		applyAll(b, dp, res, "v0")
		res = nil //nolint:ineffassign,wastedassign // let the resources go, as the xDS client does
		rss1, heap1 := memNow(b)
		b.ReportMetric(float64(rss1-rss0)/(1<<20), "services-rss-MiB")
		b.ReportMetric(float64(heap1-heap0)/(1<<20), "services-heap-MiB")

		var httpAddr string
		for _, l := range dp.listeners {
			if l.cfg.Load().http != nil {
				httpAddr = l.ln.Addr().String()
			}
		}
		conns := make([]net.Conn, 0, idle)
		for i := range idle {
			c, err := net.Dial("tcp", httpAddr)
			if err != nil {
				b.Fatalf("connection %d: %v", i, err)
			}
			conns = append(conns, c)
			// One request (no upstream answers: a 503), then the connection stays open, idle.
			if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: svc-%05d.ns-%03d.svc.cluster.local\r\n\r\n", i, i%100); err != nil {
				b.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				b.Fatalf("connection %d: %v", i, err)
			}
			resp.Body.Close()
		}
		if n := dp.downstream.Load(); n != idle {
			b.Fatalf("%d downstream connections open, want %d", n, idle)
		}
		rss2, heap2 := memNow(b)
		b.ReportMetric(float64(rss2-rss1)/idle/1024, "idle-conn-rss-KiB")
		b.ReportMetric(float64(heap2-heap1)/idle/1024, "idle-conn-heap-KiB")
		b.ReportMetric(float64(rss2)/(1<<20), "total-rss-MiB")
		for _, c := range conns {
			c.Close()
		}
		dp.shutdown()
	}
}

// memNow is the process's resident set and the Go heap in use, after a collection.
func memNow(tb testing.TB) (rss, heap uint64) {
	tb.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			rss = kb << 10
		}
	}
	return rss, ms.HeapInuse + ms.StackInuse
}

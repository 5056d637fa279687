package dataplane

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// BenchmarkHTTPKeepAlive measures HTTP/1.1 keep-alive requests through the data plane: plain
// HTTP in, Host routing, mTLS (pooled) to the mesh stand-in, and back.
//
//	go test -run '^$' -bench HTTPKeepAlive -benchtime 3s ./pkg/dataplane/
func BenchmarkHTTPKeepAlive(b *testing.B) {
	port, svc := benchHTTPService(b)
	url := fmt.Sprintf("http://127.0.0.1:%d/bench", port)
	b.Run("sequential", func(b *testing.B) {
		c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
		for b.Loop() {
			benchGet(b, c, url, svc.Host)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				benchGet(b, c, url, svc.Host)
			}
		})
	})
}

// BenchmarkHTTPDirectBaseline is the same request straight to the mesh stand-in over mTLS, to
// read the data plane's added cost against.
func BenchmarkHTTPDirectBaseline(b *testing.B) {
	e := newEnv(b, 0)
	mesh := newMeshServer(b, e.ca, reviewsID, false)
	cert, err := e.bundle.TLSCertificate()
	if err != nil {
		b.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, TLSClientConfig: &tls.Config{
		Certificates: []tls.Certificate{cert}, RootCAs: e.bundle.RootPool(), InsecureSkipVerify: true, //nolint:gosec // benchmark only
	}}}
	url := fmt.Sprintf("https://%s/bench", mesh.addr)
	b.Run("sequential", func(b *testing.B) {
		for b.Loop() {
			benchGet(b, c, url, "reviews.default.svc.cluster.local")
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				benchGet(b, c, url, "reviews.default.svc.cluster.local")
			}
		})
	})
}

func benchGet(b *testing.B, c *http.Client, url, host string) {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Fatalf("status %d", resp.StatusCode)
	}
}

// BenchmarkH1AB compares the HTTP/1.1 fast path (h1.go) with http.Transport on the same data
// plane, alternating within one run (three rounds of both sides): 32 keep-alive clients, each a raw connection writing a GET
// and reading its response (as wrk does), so the client costs little next to the proxy.
//
//	go test -run '^$' -bench H1AB -benchtime 5s ./pkg/dataplane/
func BenchmarkH1AB(b *testing.B) {
	port, svc := benchHTTPService(b)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for round := range 3 {
		for _, side := range []struct {
			name string
			off  bool
		}{{"fastpath", false}, {"transport", true}} {
			b.Run(fmt.Sprintf("%s/round%d", side.name, round+1), func(b *testing.B) {
				h1Disabled.Store(side.off)
				defer h1Disabled.Store(false)
				benchRawKeepAlive(b, addr, svc.Host, 32)
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
			})
		}
	}
}

// benchRawKeepAlive runs b.N GETs over conns keep-alive connections, one goroutine each.
func benchRawKeepAlive(b *testing.B, addr, host string, conns int) {
	req := []byte("GET /bench HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: bench\r\n\r\n")
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	b.ResetTimer()
	for range conns {
		wg.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			br := bufio.NewReader(c)
			for next.Add(1) <= int64(b.N) {
				if _, err := c.Write(req); err != nil {
					errs <- err
					return
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					errs <- err
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					errs <- fmt.Errorf("status %d", resp.StatusCode)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

// benchHTTPService serves one HTTP mesh service through a data plane, access log off, and
// returns its listener port and the service.
func benchHTTPService(b *testing.B) (uint32, catalog.Service) {
	e := newEnv(b, 0)
	mesh := newMeshServer(b, e.ca, reviewsID, false)
	port := freePort(b)
	svc := reviews(port, catalog.HTTP)
	opts := e.options(mesh.addr)
	opts.AccessLog = false
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, opts, nil)
	return port, svc
}

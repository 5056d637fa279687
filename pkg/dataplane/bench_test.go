package dataplane

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// BenchmarkHTTPKeepAlive measures HTTP/1.1 keep-alive requests through the data plane: plain
// HTTP in, Host routing, mTLS (pooled) to the mesh stand-in, and back.
//
//	go test -run '^$' -bench HTTPKeepAlive -benchtime 3s ./pkg/dataplane/
func BenchmarkHTTPKeepAlive(b *testing.B) {
	e := newEnv(b, 0)
	mesh := newMeshServer(b, e.ca, reviewsID, false)
	port := freePort(b)
	svc := reviews(port, catalog.HTTP)
	opts := e.options(mesh.addr)
	opts.AccessLog = false
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, opts, nil)
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

//go:build linux

package e2e_test

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// BenchmarkTranscoding measures REST/JSON requests transcoded to gRPC through the built-in data
// plane and through Envoy, in the same run: two daemons side by side, each in front of its own
// Go mesh (the Echo gRPC service behind a sidecar), loaded one after the other over keep-alive
// connections. Reported: requests/s, p50 and p99 per request. Run with
//
//	go test -p 1 -count=1 ./test/e2e -run '^$' -bench BenchmarkTranscoding -benchtime 5s
func BenchmarkTranscoding(b *testing.B) {
	bin, err := meshtest.EnvoyPath()
	if err != nil {
		b.Fatal(err)
	}
	envoy := dataplane{name: "envoy", failover: true, configure: func(t testing.TB, dir string) string {
		return fmt.Sprintf("dataplane: envoy\nenvoy: {binary: %s, adminAddress: 127.0.0.1:%d, bootstrapPath: %s, drainTime: 1s}\n",
			bin, freePort(t), filepath.Join(dir, "envoy-bootstrap.json"))
	}}
	planes := []struct {
		name string
		e    *env
	}{
		{"builtin", start(b, goMesh, builtin)},
		{"envoy", start(b, goMesh, envoy)},
	}
	for _, p := range planes {
		for _, c := range []struct{ name, method, path, body, want string }{
			{"UnaryGET", "GET", "/v1/shelves/s1/items/42?kind=KIND_BOOK", "", `"id":"42"`},
			{"UnaryPOSTBody", "POST", "/v1/shelves/s1/items", `{"displayName":"Dune","size":"412","tags":["a","b"]}`, `"displayName":"Dune"`},
			{"Stream10", "GET", "/v1/shelves/s1/items?count=10", "", `"id":"9"`},
		} {
			b.Run(p.name+"/"+c.name, func(b *testing.B) {
				var lat latencies
				start := time.Now()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						t0 := time.Now()
						a, err := p.e.rest(c.method, c.path, c.body, nil)
						if err != nil || a.code != 200 || !bytes.Contains(a.body, []byte(c.want)) {
							b.Errorf("%d %v %.200s", a.code, err, a.body)
							return
						}
						lat.add(time.Since(t0))
					}
				})
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
				lat.report(b)
			})
		}
	}
}

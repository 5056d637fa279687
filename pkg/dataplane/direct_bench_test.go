package dataplane

import (
	"fmt"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// BenchmarkDirectAB compares the direct path (direct.go) with httputil.ReverseProxy on the same
// data plane, alternating within one run (three rounds of both sides), with the client of
// BenchmarkH1AB: 32 raw keep-alive connections.
//
//	go test -run '^$' -bench DirectAB -benchtime 5s ./pkg/dataplane/
func BenchmarkDirectAB(b *testing.B) {
	e := newEnv(b, 0)
	mesh := newMeshServer(b, e.ca, reviewsID, false)
	port := freePort(b)
	svc := reviews(port, catalog.HTTP)
	opts := e.options(mesh.addr)
	opts.AccessLog = false
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, opts, nil)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for round := range 3 {
		for _, side := range []struct {
			name string
			off  bool
		}{{"direct", false}, {"reverseproxy", true}} {
			b.Run(fmt.Sprintf("%s/round%d", side.name, round+1), func(b *testing.B) {
				directDisabled.Store(side.off)
				defer directDisabled.Store(false)
				benchRawKeepAlive(b, addr, svc.Host, 32)
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
			})
		}
	}
}

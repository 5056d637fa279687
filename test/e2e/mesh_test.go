//go:build linux

package e2e_test

import (
	"testing"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// SPIFFE IDs of the scenario.
const (
	fleetID          = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	productpageID    = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
	reviewsID        = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
	detailsID        = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details"
	ratingsID        = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"
	addedID          = "spiffe://cluster.local/ns/bookinfo/sa/added"
	mysqlID          = "spiffe://cluster.local/ns/bookinfo/sa/mysql"
	echoID           = "spiffe://cluster.local/ns/bookinfo/sa/echo"
	impostorExpected = "spiffe://cluster.local/ns/bookinfo/sa/impostor"
	impostorActual   = "spiffe://cluster.local/ns/bookinfo/sa/attacker"
)

// ports are the plain service ports the data plane listens on.
type ports struct{ http, h2, tcp, grpc int }

// sidecarSpec is one workload behind the gateways.
type sidecarSpec struct {
	name, id, proto string
	target          meshtest.Target
}

func sidecarSpecs(p ports) []sidecarSpec {
	svc := func(name string) string { return name + ".bookinfo.svc.cluster.local" }
	h := uint32(p.http)
	return []sidecarSpec{
		{"productpage", productpageID, meshtest.HTTP, meshtest.Target{Host: svc("productpage"), Port: h}},
		{"reviews-v1", reviewsID, meshtest.HTTP, meshtest.Target{Host: svc("reviews"), Port: h}},
		{"reviews-v2", reviewsID, meshtest.HTTP, meshtest.Target{Host: svc("reviews"), Port: h, Subset: "v2"}},
		{"details", detailsID, meshtest.HTTP, meshtest.Target{Host: svc("details"), Port: h}},
		{"impostor", impostorActual, meshtest.HTTP, meshtest.Target{Host: svc("impostor"), Port: h}},
		{"added", addedID, meshtest.HTTP, meshtest.Target{Host: svc("added"), Port: h}},
		{"ratings", ratingsID, meshtest.HTTP, meshtest.Target{Host: svc("ratings"), Port: uint32(p.h2)}},
		{"mysql", mysqlID, meshtest.TCP, meshtest.Target{Host: svc("mysql"), Port: uint32(p.tcp)}},
		// The gRPC Echo service, which the catalog transcodes (transcode_test.go).
		{"echo", echoID, meshtest.GRPC, meshtest.Target{Host: svc("echo"), Port: uint32(p.grpc)}},
	}
}

// mesh is the mesh side of the scenario: two east-west gateways routing to the sidecars.
type mesh struct {
	kind     string
	gateways []string
	// stopGateway takes gateway i away, cutting its connections.
	stopGateway func(i int)
	// stats are a sidecar's counters; ok is false when the stand-in cannot tell (HAProxy, nginx).
	// Envoy's come from its admin /stats (TLS handshakes and failures) and its application.
	stats func(name string) (st meshtest.SidecarStats, ok bool)
	// routed is how many connections gateway i forwarded; ok as for stats.
	routed func(i int) (n int64, ok bool)
	// echo: the TCP sidecar echoes after its report line (nginx closes after it).
	echo bool
}

// goMesh runs the Go stand-ins.
func goMesh(t testing.TB, ca *meshtest.CA, p ports) *mesh {
	t.Helper()
	sidecars := map[string]*meshtest.Sidecar{}
	var gws []*meshtest.Gateway
	for range 2 {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		g, err := meshtest.StartGateway(addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Close() })
		gws = append(gws, g)
	}
	for _, s := range sidecarSpecs(p) {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		sc, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: s.name, SPIFFEID: s.id, CA: ca, Protocol: s.proto, Addr: addr})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sc.Close() })
		sidecars[s.name] = sc
		for _, g := range gws {
			g.Route(s.target, sc.Addr())
		}
	}
	return &mesh{
		kind:        "go",
		gateways:    []string{gws[0].Addr(), gws[1].Addr()},
		stopGateway: func(i int) { gws[i].Close() },
		stats:       func(name string) (meshtest.SidecarStats, bool) { return sidecars[name].Stats(), true },
		routed:      func(i int) (int64, bool) { return gws[i].Stats().Routed, true },
		echo:        true,
	}
}

// debianMesh runs HAProxy as the two gateways and the HTTP sidecars, nginx as the TCP sidecar.
func debianMesh(t testing.TB, ca *meshtest.CA, p ports) *mesh {
	t.Helper()
	dir := t.TempDir()
	routes := map[meshtest.Target]string{}
	var httpSidecars []meshtest.SidecarOptions
	for _, s := range sidecarSpecs(p) {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		o := meshtest.SidecarOptions{Name: s.name, SPIFFEID: s.id, CA: ca, Protocol: s.proto, Addr: addr}
		routes[s.target] = addr
		if s.proto == meshtest.HTTP || s.proto == meshtest.GRPC {
			httpSidecars = append(httpSidecars, o)
			continue
		}
		ng, err := meshtest.StartNginxSidecar(dir, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ng.Stop() })
	}
	hs, err := meshtest.StartHAProxySidecars(dir, httpSidecars...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hs.Stop() })
	var gws []*meshtest.Process
	for range 2 {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		g, err := meshtest.StartHAProxyGateway(dir, addr, routes)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Stop() })
		gws = append(gws, g)
	}
	return &mesh{
		kind:        "debian",
		gateways:    []string{gws[0].Addr, gws[1].Addr},
		stopGateway: func(i int) { gws[i].Stop() },
		stats:       func(string) (meshtest.SidecarStats, bool) { return meshtest.SidecarStats{}, false },
		routed:      func(int) (int64, bool) { return 0, false },
	}
}

// envoyMesh runs real Envoys configured as istiod configures them: two AUTO_PASSTHROUGH
// east-west gateways and one Envoy holding every sidecar's STRICT mTLS inbound listener, each in
// front of a Go application that reports what Envoy told it.
func envoyMesh(t testing.TB, ca *meshtest.CA, p ports) *mesh {
	t.Helper()
	dir := t.TempDir()
	routes := map[meshtest.Target]string{}
	var opts []meshtest.SidecarOptions
	for _, s := range sidecarSpecs(p) {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, meshtest.SidecarOptions{Name: s.name, SPIFFEID: s.id, CA: ca, Protocol: s.proto, Addr: addr})
		routes[s.target] = addr
	}
	sidecars, err := meshtest.StartEnvoySidecars(dir, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sidecars.Stop() })
	var gws []*meshtest.Process
	for range 2 {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		g, err := meshtest.StartEnvoyGateway(dir, addr, routes)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Stop() })
		gws = append(gws, g)
	}
	return &mesh{
		kind:        "envoy",
		gateways:    []string{gws[0].Addr, gws[1].Addr},
		stopGateway: func(i int) { gws[i].Stop() },
		stats: func(name string) (meshtest.SidecarStats, bool) {
			st, err := sidecars.Stats(name)
			if err != nil {
				t.Errorf("sidecar %s stats: %v", name, err)
				return st, false
			}
			return st, true
		},
		routed: func(i int) (int64, bool) {
			st, err := meshtest.EnvoyGatewayStats(gws[i])
			if err != nil {
				t.Errorf("gateway %d stats: %v", i, err)
				return 0, false
			}
			return st.Routed, true
		},
		echo: true,
	}
}

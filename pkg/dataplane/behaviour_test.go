package dataplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	directresponse "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/direct_response/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

func TestTCPProxyHalfClose(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	port := freePort(t)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{reviews(port, catalog.TCP)}}, e.options(mesh.addr), nil)

	c := dialTCP(t, port)
	greeting := c.line(t)
	want := fmt.Sprintf("hi %s serial=%s sni=outbound_.%d_._.reviews.default.svc.cluster.local\n", fleetID, e.bundle.Leaf.SerialNumber, port)
	if greeting != want {
		t.Fatalf("greeting %q, want %q", greeting, want)
	}
	c.ping(t, "ping")
	// Half-close: the service sees EOF and can still answer.
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(c.r)
	if err != nil || string(rest) != "bye\n" {
		t.Fatalf("after half-close: %q, %v", rest, err)
	}
	h, _ := mesh.last()
	if !slices.Equal(h.alpn, controlplane.ALPNTCP) {
		t.Errorf("ALPN offered %q, want %q", h.alpn, controlplane.ALPNTCP)
	}
	name := controlplane.ListenerName("127.0.0.1", port)
	eventually(t, "the access log line", func() bool { return strings.Contains(e.access.String(), `"- - -" 0 - 5 `) })
	eventually(t, "the connection to close", func() bool { return counter(t, e.dp.metrics.connActive.WithLabelValues(name)) == 0 })
	if n := counter(t, e.dp.metrics.connTotal.WithLabelValues(name)); n != 1 {
		t.Errorf("connections_total = %v", n)
	}
}

func TestUpstreamVerificationFailsClosed(t *testing.T) {
	e := newEnv(t, 0)
	// A server with the right CA but another identity, and one with the right identity from
	// another CA.
	wrongSAN := newMeshServer(t, e.ca, "spiffe://cluster.local/ns/default/sa/impostor", false)
	otherCA, err := meshtest.NewCA("other")
	if err != nil {
		t.Fatal(err)
	}
	wrongCA := newMeshServer(t, otherCA, reviewsID, true)
	httpPort, tcpPort := freePort(t), freePort(t)
	svcHTTP := reviews(httpPort, catalog.HTTP)
	svcHTTP.Gateways = []string{"eastwest"}
	svcTCP := catalog.Service{Host: "db.default.svc.cluster.local", Ports: []catalog.Port{{Number: tcpPort, Protocol: catalog.TCP}},
		Identities: []string{reviewsID}, Gateways: []string{"other"}}
	opts := e.options(wrongSAN.addr)
	opts.Gateways = append(opts.Gateways, controlplane.Gateway{Name: "other", Addresses: []netip.AddrPort{wrongCA.addr}})
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svcHTTP, svcTCP}}, opts, nil)

	resp := get(t, &http.Client{}, httpPort, "reviews.default.svc.cluster.local", "/")
	b := body(t, resp)
	// Envoy's answer, and nothing of the upstream (its address, its certificate's names).
	if resp.StatusCode != http.StatusServiceUnavailable || b != "upstream connect error or disconnect/reset before headers. reset reason: connection failure" ||
		resp.Header.Get("Content-Type") != "text/plain" {
		t.Errorf("wrong SAN: %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	if wrongSAN.accepts.Load() == 0 {
		t.Error("the impostor was never contacted")
	}
	cl := controlplane.ClusterName(httpPort, "", svcHTTP.Host)
	if n := counter(t, e.dp.metrics.tlsFailures.WithLabelValues(cl)); n < 1 {
		t.Errorf("tls_handshake_failures_total = %v", n)
	}
	c := dialTCP(t, tcpPort)
	if got, err := io.ReadAll(c.r); len(got) != 0 {
		t.Errorf("wrong CA: got %q, %v; want the connection closed", got, err)
	}
	if n := counter(t, e.dp.metrics.upstreamErrs.WithLabelValues(controlplane.ClusterName(tcpPort, "", svcTCP.Host), reasonTLS)); n < 1 {
		t.Errorf("upstream_errors_total{tls} = %v", n)
	}
}

func TestRBACDeny(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	tcpMesh := newMeshServer(t, e.ca, reviewsID, true)
	port, tcpPort := freePort(t), freePort(t)
	denied := reviews(port, catalog.HTTP)
	denied.AllowedClients = []string{"10.0.0.0/8"}
	denied.Gateways = []string{"eastwest"}
	allowed := catalog.Service{Host: "ratings.default.svc.cluster.local", Ports: []catalog.Port{{Number: port, Protocol: catalog.HTTP}},
		Identities: []string{reviewsID}, AllowedClients: []string{"10.0.0.0/8", "127.0.0.0/8"}, Gateways: []string{"eastwest"}}
	open := catalog.Service{Host: "open.default.svc.cluster.local", Ports: []catalog.Port{{Number: port, Protocol: catalog.HTTP}},
		Identities: []string{reviewsID}, Gateways: []string{"eastwest"}}
	tcpDenied := catalog.Service{Host: "db.default.svc.cluster.local", Ports: []catalog.Port{{Number: tcpPort, Protocol: catalog.TCP}},
		Identities: []string{reviewsID}, AllowedClients: []string{"192.168.0.0/16"}, Gateways: []string{"tcp"}}
	opts := e.options(mesh.addr)
	opts.Gateways = append(opts.Gateways, controlplane.Gateway{Name: "tcp", Addresses: []netip.AddrPort{tcpMesh.addr}})
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{denied, allowed, open, tcpDenied}}, opts, nil)

	c := &http.Client{}
	resp := get(t, c, port, denied.Host, "/")
	if b := body(t, resp); resp.StatusCode != http.StatusForbidden || b != "RBAC: access denied" {
		t.Errorf("denied service: %d %q", resp.StatusCode, b)
	}
	for _, h := range []string{allowed.Host, open.Host} {
		resp = get(t, c, port, h, "/")
		if b := body(t, resp); resp.StatusCode != 200 {
			t.Errorf("%s: %d %q", h, resp.StatusCode, b)
		}
	}
	if n := counter(t, e.dp.metrics.rbacDenied.WithLabelValues(controlplane.ListenerName("127.0.0.1", port))); n != 1 {
		t.Errorf("rbac_denied_total (HTTP) = %v", n)
	}
	conn := dialTCP(t, tcpPort)
	if got, _ := io.ReadAll(conn.r); len(got) != 0 {
		t.Errorf("denied TCP connection got %q", got)
	}
	if n := tcpMesh.accepts.Load(); n != 0 {
		t.Errorf("denied TCP connection reached the upstream (%d accepts)", n)
	}
	if n := counter(t, e.dp.metrics.rbacDenied.WithLabelValues(controlplane.ListenerName("127.0.0.1", tcpPort))); n != 1 {
		t.Errorf("rbac_denied_total (TCP) = %v", n)
	}
}

// An unsupported resource is rejected with a precise message and the last config keeps serving;
// a later good config is accepted again.
func TestNACKKeepsLastGoodConfig(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	port, port2 := freePort(t), freePort(t)
	opts := e.options(mesh.addr)
	cat := func(ports ...uint32) *catalog.Catalog {
		var c catalog.Catalog
		for i, p := range ports {
			c.Services = append(c.Services, catalog.Service{Host: fmt.Sprintf("s%d.default.svc.cluster.local", i),
				Ports: []catalog.Port{{Number: p, Protocol: catalog.TCP}}, Identities: []string{reviewsID}})
		}
		return &c
	}
	good := e.pushApplied(cat(port), opts, nil)

	// A listener with a filter the data plane does not implement.
	e.push(cat(port, port2), opts, func(r *controlplane.Resources) {
		i := slices.IndexFunc(r.Listeners, func(l *listener.Listener) bool { return l.Name == controlplane.ListenerName("127.0.0.1", port) })
		fc := r.Listeners[i].FilterChains[0]
		a, _ := anypb.New(&directresponse.Config{Response: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "x"}}})
		fc.Filters = append([]*listener.Filter{{Name: "envoy.filters.network.direct_response", ConfigType: &listener.Filter_TypedConfig{TypedConfig: a}}}, fc.Filters...)
	})
	eventually(t, "the rejection", func() bool { return e.dp.Status().LastRejection != "" })
	st := e.dp.Status()
	want := fmt.Sprintf(`listener "127.0.0.1_%d": filter_chains[0].filters[0] (envoy.filters.network.direct_response): network filter envoy.extensions.filters.network.direct_response.v3.Config is not supported`, port)
	if !strings.Contains(st.LastRejection, want) {
		t.Errorf("rejection %q\nwant it to contain %q", st.LastRejection, want)
	}
	if st.Versions["listener"] != good.Cache.GetVersion(resource.ListenerType) {
		t.Errorf("listener version %q, want the last good %q", st.Versions["listener"], good.Cache.GetVersion(resource.ListenerType))
	}
	if _, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port2)); err == nil {
		t.Error("a listener of the rejected config is serving")
	}
	c := dialTCP(t, port)
	c.line(t)
	c.ping(t, "still serving")

	// A cluster with a load balancing policy it does not implement.
	e.push(cat(port), opts, func(r *controlplane.Resources) {
		r.Clusters[0].LbPolicy = clusterpb.Cluster_LEAST_REQUEST
	})
	eventually(t, "the cluster rejection", func() bool { return strings.Contains(e.dp.Status().LastRejection, "lb_policy") })
	if got := e.dp.Status().LastRejection; !strings.Contains(got, `cluster "outbound|`) || !strings.Contains(got, "lb_policy: LEAST_REQUEST is not supported; use ROUND_ROBIN") {
		t.Errorf("cluster rejection %q", got)
	}
	c2 := dialTCP(t, port)
	c2.line(t)

	// A good config is accepted again.
	e.pushApplied(cat(port, port2), opts, nil)
	c3 := dialTCP(t, port2)
	c3.line(t)
	if n := counter(t, e.dp.metrics.xdsRejections.WithLabelValues("listener")); n != 1 {
		t.Errorf("listener rejections = %v", n)
	}
}

// A removed listener stops accepting at once; its open connections keep working until the
// drain time is over, then they are closed.
func TestListenerRemovalDrains(t *testing.T) {
	drain := 1500 * time.Millisecond
	e := newEnv(t, drain)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	pa, pb := freePort(t), freePort(t)
	a := catalog.Service{Host: "a.default.svc.cluster.local", Ports: []catalog.Port{{Number: pa, Protocol: catalog.TCP}}, Identities: []string{reviewsID}}
	b := catalog.Service{Host: "b.default.svc.cluster.local", Ports: []catalog.Port{{Number: pb, Protocol: catalog.TCP}}, Identities: []string{reviewsID}}
	opts := e.options(mesh.addr)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{a, b}}, opts, nil)
	c := dialTCP(t, pa)
	c.line(t)

	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{b}}, opts, nil)
	removed := time.Now()
	eventually(t, "the removed listener to stop accepting", func() bool {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", pa))
		if err == nil {
			conn.Close()
		}
		return err != nil
	})
	c.ping(t, "draining")
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.r.ReadString('\n')
	if err == nil {
		t.Fatal("connection still open after the drain time")
	}
	if el := time.Since(removed); el < drain-200*time.Millisecond {
		t.Errorf("connection closed after %v, before the drain time %v", el, drain)
	}
	other := dialTCP(t, pb)
	other.line(t)
}

// A config change leaves unchanged listeners' sockets alone and lets open connections (TCP and
// HTTP keep-alive, including on a listener whose config changed) carry on.
func TestConfigSwapKeepsConnections(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	tcpMesh := newMeshServer(t, e.ca, reviewsID, true)
	tcpPort, httpPort, newPort := freePort(t), freePort(t), freePort(t)
	db := catalog.Service{Host: "db.default.svc.cluster.local", Ports: []catalog.Port{{Number: tcpPort, Protocol: catalog.TCP}},
		Identities: []string{reviewsID}, Gateways: []string{"tcp"}}
	web := reviews(httpPort, catalog.HTTP)
	web.Gateways = []string{"eastwest"}
	opts := e.options(mesh.addr)
	opts.Gateways = append(opts.Gateways, controlplane.Gateway{Name: "tcp", Addresses: []netip.AddrPort{tcpMesh.addr}})
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{db, web}}, opts, nil)
	sockets := map[string]net.Listener{}
	e.dp.mu.Lock()
	for addr, l := range e.dp.listeners {
		sockets[addr] = l.ln
	}
	e.dp.mu.Unlock()

	tc := dialTCP(t, tcpPort)
	tc.line(t)
	client := &http.Client{}
	reused := func() bool {
		var r bool
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { r = i.Reused }})
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/", httpPort), nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = web.Host
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if b := body(t, resp); resp.StatusCode != 200 {
			t.Fatalf("%d %q", resp.StatusCode, b)
		}
		return r
	}
	reused()

	// Add a service on a new port and change the HTTP listener (an RBAC filter appears).
	web.AllowedClients = []string{"127.0.0.0/8"}
	extra := catalog.Service{Host: "extra.default.svc.cluster.local", Ports: []catalog.Port{{Number: newPort, Protocol: catalog.HTTP}},
		Identities: []string{reviewsID}, Gateways: []string{"eastwest"}}
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{db, web, extra}}, opts, nil)

	tc.ping(t, "after the swap")
	if !reused() {
		t.Error("the HTTP keep-alive connection did not survive the update")
	}
	resp := get(t, client, newPort, extra.Host, "/")
	if resp.StatusCode != 200 {
		t.Errorf("new listener: %d", resp.StatusCode)
	}
	body(t, resp)
	e.dp.mu.Lock()
	for addr, ln := range sockets {
		if e.dp.listeners[addr] == nil || e.dp.listeners[addr].ln != ln {
			t.Errorf("listener %s was rebound", addr)
		}
	}
	e.dp.mu.Unlock()
}

// A rotated fleet certificate is used by the next connection, without a restart.
func TestSecretRotation(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	port := freePort(t)
	cat := &catalog.Catalog{Services: []catalog.Service{reviews(port, catalog.TCP)}}
	opts := e.options(mesh.addr)
	e.pushApplied(cat, opts, nil)
	first := dialTCP(t, port)
	if g := first.line(t); !strings.Contains(g, "serial="+e.bundle.Leaf.SerialNumber.String()+" ") {
		t.Fatalf("greeting %q lacks serial %s", g, e.bundle.Leaf.SerialNumber)
	}
	old := e.bundle.Leaf.SerialNumber.String()
	e.bundle = e.issueFleet()
	e.pushApplied(cat, opts, nil)
	second := dialTCP(t, port)
	if g := second.line(t); !strings.Contains(g, "serial="+e.bundle.Leaf.SerialNumber.String()+" ") {
		t.Fatalf("after rotation, greeting %q lacks the new serial %s (old %s)", g, e.bundle.Leaf.SerialNumber, old)
	}
	first.ping(t, "the old connection is untouched")
}

// With one of two gateway endpoints down, requests keep succeeding (a failed connection is
// retried on the other endpoint), the dead endpoint is ejected after the configured number of
// consecutive failures and not tried again, and max_ejection_percent keeps the last one in.
func TestOutlierEjection(t *testing.T) {
	e := newEnv(t, 0)
	e.outlier = controlplane.Outlier{ConsecutiveErrors: 3, Interval: 50 * time.Millisecond, BaseEjectionTime: time.Minute, MaxEjectionPercent: 50}
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	dead := netip.MustParseAddrPort(fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr, dead), nil)
	cl := controlplane.ClusterName(port, "", svc.Host)

	client := &http.Client{}
	for i := range 20 {
		resp := get(t, client, port, svc.Host, "/")
		if b := body(t, resp); resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, b)
		}
	}
	if n := counter(t, e.dp.metrics.ejections.WithLabelValues(cl)); n != 1 {
		t.Errorf("ejections_total = %v, want 1", n)
	}
	if n := counter(t, e.dp.metrics.upstreamErrs.WithLabelValues(cl, reasonConnect)); n != 3 {
		t.Errorf("connect errors = %v, want exactly 3 (then the endpoint is ejected)", n)
	}
	if got := e.dp.Status().Clusters[cl]; !strings.Contains(got, dead.String()+"(ejected)") {
		t.Errorf("cluster status %q does not show %s ejected", got, dead)
	}
	// The live endpoint failing too may not eject it: 2 of 2 would exceed 50%.
	for range 5 {
		resp := get(t, client, port, svc.Host, "/fail")
		body(t, resp)
	}
	if n := counter(t, e.dp.metrics.ejections.WithLabelValues(cl)); n != 1 {
		t.Errorf("ejections_total = %v after the live endpoint failed; max_ejection_percent not respected", n)
	}
	resp := get(t, client, port, svc.Host, "/")
	if resp.StatusCode != 200 {
		t.Errorf("after failures: %d", resp.StatusCode)
	}
	body(t, resp)
}

// The data plane keeps serving while the control plane is away and picks up changes when it is
// back.
func TestReconnectAfterControlPlaneRestart(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	p1, p2 := freePort(t), freePort(t)
	svc := func(host string, p uint32) catalog.Service {
		return catalog.Service{Host: host, Ports: []catalog.Port{{Number: p, Protocol: catalog.TCP}}, Identities: []string{reviewsID}}
	}
	opts := e.options(mesh.addr)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc("a.default.svc.cluster.local", p1)}}, opts, nil)

	e.grpc.Stop()
	eventually(t, "the data plane to notice", func() bool { return !e.dp.Status().Connected })
	c := dialTCP(t, p1)
	c.line(t)
	c.ping(t, "while disconnected")

	e.startControlPlane(e.cpAddr)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc("a.default.svc.cluster.local", p1), svc("b.default.svc.cluster.local", p2)}}, opts, nil)
	if !e.dp.Status().Connected {
		t.Error("not connected after the restart")
	}
	c2 := dialTCP(t, p2)
	c2.line(t)
	c.ping(t, "after the restart")
}

func TestNoEndpointsIs503(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), func(r *controlplane.Resources) {
		for _, ep := range r.Endpoints {
			ep.Endpoints = nil
		}
	})
	resp := get(t, &http.Client{}, port, svc.Host, "/")
	if b := body(t, resp); resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(b, "no healthy upstream") {
		t.Errorf("%d %q", resp.StatusCode, b)
	}
	cl := controlplane.ClusterName(port, "", svc.Host)
	if n := counter(t, e.dp.metrics.upstreamErrs.WithLabelValues(cl, reasonNoHealthy)); n != 1 {
		t.Errorf("no_healthy_upstream = %v", n)
	}
	var ue *upstreamError
	if errors.As(error(&upstreamError{reason: reasonNoHealthy}), &ue) && !strings.Contains(ue.Error(), "no healthy upstream") {
		t.Error(ue.Error())
	}
}

func TestSubsetHostAndRouteTimeout(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	svc.Subsets = []catalog.Subset{{Name: "v2", Hosts: []string{"reviews-v2.example.com"}}}
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), func(r *controlplane.Resources) {
		for _, vh := range r.Routes[0].VirtualHosts {
			vh.Routes[0].GetRoute().Timeout = durationpb.New(200 * time.Millisecond)
		}
	})
	c := &http.Client{}
	resp := get(t, c, port, "reviews-v2.example.com", "/")
	body(t, resp)
	if sni := resp.Header.Get("X-Seen-Sni"); sni != fmt.Sprintf("outbound_.%d_.v2_.reviews.default.svc.cluster.local", port) {
		t.Errorf("subset SNI %q", sni)
	}
	resp = get(t, c, port, svc.Host, "/slow")
	if b := body(t, resp); resp.StatusCode != http.StatusGatewayTimeout || !strings.Contains(b, "upstream request timeout") {
		t.Errorf("slow upstream: %d %q", resp.StatusCode, b)
	}
	cl := controlplane.ClusterName(port, "", svc.Host)
	if n := counter(t, e.dp.metrics.upstreamErrs.WithLabelValues(cl, reasonTimeout)); n != 1 {
		t.Errorf("upstream_errors_total{timeout} = %v", n)
	}
	if n := counter(t, e.dp.metrics.requests.WithLabelValues(cl, "504")); n != 1 {
		t.Errorf("requests_total{504} = %v", n)
	}
}

// Delta xDS: a removed service's listener and cluster go away, a change to one service brings
// only its resources, and resources removed while the data plane was disconnected are removed
// when it reconnects (it tells the control plane what it holds).
func TestDeltaChangesAndRemovals(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := newEnvWith(t, 0, nil)
	e.cp = controlplane.NewServer(testLog(t), reg)
	e.grpc.Stop()
	e.startControlPlane(e.cpAddr)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	svc := func(host string, p uint32) catalog.Service {
		return catalog.Service{Host: host, Ports: []catalog.Port{{Number: p, Protocol: catalog.TCP}}, Identities: []string{reviewsID}}
	}
	pa, pb, pc := freePort(t), freePort(t), freePort(t)
	a, b, c := svc("a.default.svc.cluster.local", pa), svc("b.default.svc.cluster.local", pb), svc("c.default.svc.cluster.local", pc)
	opts := e.options(mesh.addr)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{a, b}}, opts, nil)
	sent := func() float64 { // resources sent so far, all types
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		total := 0.0
		for _, mf := range mfs {
			if mf.GetName() == "fwdproxy_xds_resources_sent_total" {
				for _, m := range mf.GetMetric() {
					total += m.GetCounter().GetValue()
				}
			}
		}
		return total
	}
	before := sent()
	b.Identities = []string{reviewsID, "spiffe://cluster.local/ns/default/sa/other"}
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{a, b}}, opts, nil)
	// b's cluster, and its endpoints, which are versioned with their cluster so that Envoy's
	// updated cluster gets them and finishes warming; b's listener and a are unchanged.
	if n := sent() - before; n != 2 {
		t.Errorf("a change to one cluster sent %v resources; want 2", n)
	}

	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{a}}, opts, nil)
	st := e.dp.Status()
	if len(st.Listeners) != 1 || len(st.Clusters) != 1 {
		t.Fatalf("after removing b: listeners %v, clusters %v", st.Listeners, st.Clusters)
	}

	e.grpc.Stop()
	eventually(t, "the data plane to notice", func() bool { return !e.dp.Status().Connected })
	e.push(&catalog.Catalog{Services: []catalog.Service{c}}, opts, nil) // a removed meanwhile
	e.startControlPlane(e.cpAddr)
	eventually(t, "a's listener removed and c's added after the reconnect", func() bool {
		st := e.dp.Status()
		_, hasC := st.Listeners[controlplane.ListenerName("127.0.0.1", pc)]
		return len(st.Listeners) == 1 && hasC && len(st.Clusters) == 1 && st.Ready
	})
	conn := dialTCP(t, pc)
	conn.line(t)
}

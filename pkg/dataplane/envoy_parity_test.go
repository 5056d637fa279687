package dataplane

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// echoServer records the headers of each request by its X-Case header.
type echoServer struct {
	addr string
	mu   sync.Mutex
	seen map[string]*http.Request
}

func startEcho(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echoServer{addr: ln.Addr().String(), seen: map[string]*http.Request{}}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		e.seen[r.Header.Get("X-Case")] = r.Clone(context.Background())
		e.mu.Unlock()
		answerPeerMetadata(w, r)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return e
}

func (e *echoServer) received(c string) *http.Request {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.seen[c]
}

// plainStatic is a STATIC cluster of one plain-text endpoint, with outlier detection (every
// cluster has it) that ejects nothing.
func plainStatic(name, addr string) *clusterpb.Cluster {
	host, port, _ := net.SplitHostPort(addr)
	var p uint32
	fmt.Sscan(port, &p)
	return &clusterpb.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterpb.Cluster_Type{Type: clusterpb.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(2 * time.Second),
		OutlierDetection: &clusterpb.OutlierDetection{EnforcingConsecutive_5Xx: wrapperspb.UInt32(0),
			EnforcingConsecutiveGatewayFailure: wrapperspb.UInt32(0)},
		LoadAssignment: &endpoint.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpoint.LocalityLbEndpoints{{
			LbEndpoints: []*endpoint.LbEndpoint{{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
				Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
					Address: host, PortSpecifier: &core.SocketAddress_PortValue{PortValue: p}}}},
			}}}},
		}}},
	}
}

// startEnvoy runs Envoy with the translated HTTP listener l (its route configuration rc inlined,
// listening on port) and the cluster c.
func startEnvoy(t *testing.T, l *listener.Listener, rc *route.RouteConfiguration, c *clusterpb.Cluster, port uint32) {
	t.Helper()
	bin, err := meshtest.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	l = proto.Clone(l).(*listener.Listener)
	l.Address.GetSocketAddress().PortSpecifier = &core.SocketAddress_PortValue{PortValue: port}
	f := l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1]
	m := &hcm.HttpConnectionManager{}
	if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
		t.Fatal(err)
	}
	m.AccessLog = nil
	m.RouteSpecifier = &hcm.HttpConnectionManager_RouteConfig{RouteConfig: proto.Clone(rc).(*route.RouteConfiguration)}
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: a}
	bs := &bootstrap.Bootstrap{StaticResources: &bootstrap.Bootstrap_StaticResources{
		Listeners: []*listener.Listener{l}, Clusters: []*clusterpb.Cluster{c}}}
	js, err := protojson.Marshal(bs)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "envoy.json")
	if err := os.WriteFile(cfg, js, 0o644); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "envoy.log"))
	if err != nil {
		t.Fatal(err)
	}
	// No hot restart: no shared memory or domain socket to collide with other Envoys here.
	cmd := exec.Command(bin, "-c", cfg, "--disable-hot-restart", "-l", "warning")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("envoy log:\n%s", b)
		}
	})
	eventually(t, "Envoy to listen", func() bool {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
}

// The built-in data plane and Envoy 1.40, given the same translated HTTP listener and routes, send
// the same request headers upstream for a VM's request, forged headers and all.
func TestRequestHeadersAsEnvoySendsThem(t *testing.T) {
	e := newEnv(t, 0)
	echo := startEcho(t)
	port, envoyPort := freePort(t), freePort(t)
	svc := reviews(port, catalog.HTTP)
	cat := &catalog.Catalog{Services: []catalog.Service{svc}}
	cl := plainStatic(controlplane.ClusterName(port, "", svc.Host), echo.addr)
	opts := e.options(netip.MustParseAddrPort(echo.addr))
	snap := e.push(cat, opts, func(r *controlplane.Resources) {
		r.Clusters, r.Endpoints = []*clusterpb.Cluster{cl}, nil
	})
	// Without TLS upstream the data plane asks for no secret: wait for the rest only.
	eventually(t, "the data plane to apply the listener and cluster", func() bool {
		st := e.dp.Status()
		return st.Ready && st.Versions["listener"] == snap.Cache.GetVersion(resource.ListenerType) &&
			st.Versions["cluster"] == snap.Cache.GetVersion(resource.ClusterType)
	})
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	startEnvoy(t, res.Listeners[0], res.Routes[0], cl, envoyPort)

	withXFF := forged.Clone()
	withXFF["X-Forwarded-For"] = []string{"1.2.3.4, 5.6.7.8", "9.9.9.9"}
	hopByHop := http.Header{"Connection": {"keep-alive, X-Private"}, "X-Private": {"secret"}, "Te": {"trailers, deflate"},
		"Keep-Alive": {"timeout=5"}, "X-Custom": {"kept"}, "X-Forwarded-Host": {"vm.example"}, "Forwarded": {"for=10.1.2.3"}}
	cases := []struct {
		name string
		h2   bool
		hdr  http.Header
	}{
		{"forged", false, forged},
		{"forged over h2c", true, forged},
		{"the VM's X-Forwarded-For", false, withXFF},
		{"hop-by-hop and pass-through", false, hopByHop},
	}
	// From 127.0.0.2: for a client on 127.0.0.1 Envoy appends its host's own address to
	// X-Forwarded-For, which the built-in data plane does not emulate.
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := clientFrom(t, "127.0.0.2", tc.h2)
			var got [2]*http.Request
			for i, p := range []uint32{port, envoyPort} {
				hdr := tc.hdr.Clone()
				hdr.Set("X-Case", fmt.Sprintf("%s/%d", tc.name, i))
				if code, b := send(t, c, p, svc.Host, "/x", hdr); code != 200 {
					t.Fatalf("%d: %d %q", p, code, b)
				}
				got[i] = echo.received(hdr.Get("X-Case"))
				if got[i] == nil {
					t.Fatalf("port %d: the request did not arrive", p)
				}
				got[i].Header.Del("X-Case")
			}
			ours, envoys := got[0].Header, got[1].Header
			for _, h := range []http.Header{ours, envoys} {
				if id := h.Get("X-Request-Id"); !uuidRE.MatchString(id) || id == tc.hdr.Get("X-Request-Id") {
					t.Errorf("X-Request-Id %q, want a new UUID", id)
				}
				h.Del("X-Request-Id")
			}
			names := func(h http.Header) []string {
				var n []string
				for k := range h {
					n = append(n, k)
				}
				slices.Sort(n)
				return n
			}
			for _, k := range names(envoys) {
				if !slices.Equal(ours[k], envoys[k]) {
					t.Errorf("%s: built-in %q, Envoy %q", k, ours[k], envoys[k])
				}
			}
			for _, k := range names(ours) {
				if _, ok := envoys[k]; !ok {
					t.Errorf("%s: built-in %q, Envoy sends none", k, ours[k])
				}
			}
			if got[0].Host != got[1].Host {
				t.Errorf("Host: built-in %q, Envoy %q", got[0].Host, got[1].Host)
			}
			if t.Failed() {
				t.Logf("built-in: %v\nEnvoy:    %v", names(ours), names(envoys))
			}
		})
	}
	if !strings.Contains(e.access.String(), "127.0.0.2") {
		t.Errorf("no access log line from the built-in data plane")
	}
}

package dataplane

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

var fleetPeer = controlplane.PeerMetadata{WorkloadName: "vm-fleet", Namespace: "legacy", CanonicalService: "billing-vm",
	CanonicalRevision: "v3", App: "billing-vm", Version: "v3", ClusterID: "vms"}

// forgedPeer is a VM posing as another workload with Istio's peer metadata headers.
var forgedPeer = http.Header{
	meshtest.PeerMetadataIDHeader: {"sidecar~10.0.0.9~admin-0.payments~payments.svc.cluster.local"},
	meshtest.PeerMetadataHeader:   {"ChwKDkFQUF9DT05UQUlORVJTEgoaCGFkbWluLTA="},
}

// checkPeerHeaders asserts that h carries exactly fwdproxy's peer metadata, decoded as Istio does.
func checkPeerHeaders(t *testing.T, what string, h http.Header) {
	t.Helper()
	id, value, _ := fleetPeer.Headers()
	if got := h.Values(meshtest.PeerMetadataIDHeader); len(got) != 1 || got[0] != id {
		t.Errorf("%s: x-envoy-peer-metadata-id %q, want only fwdproxy's %q", what, got, id)
	}
	got := h.Values(meshtest.PeerMetadataHeader)
	if len(got) != 1 || got[0] != value {
		t.Fatalf("%s: x-envoy-peer-metadata %q, want only fwdproxy's", what, got)
	}
	p, err := meshtest.DecodePeerMetadata(got[0])
	if err != nil || p.String() != "vm-fleet.legacy" || p.CanonicalService != "billing-vm" || p.CanonicalRevision != "v3" ||
		p.App != "billing-vm" || p.Version != "v3" || p.Cluster != "vms" {
		t.Errorf("%s: Istio decodes %+v (%v)", what, p, err)
	}
}

func translatedWithPeer(t *testing.T) *controlplane.Resources {
	t.Helper()
	cat := &catalog.Catalog{Services: []catalog.Service{reviews(8080, catalog.HTTP)}}
	cat.Normalize()
	pm := fleetPeer
	res, err := controlplane.Translate(cat, controlplane.Options{ListenAddress: "0.0.0.0",
		Gateways:     []controlplane.Gateway{{Name: "gw", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:15443")}}},
		PeerMetadata: &pm})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// The built-in data plane accepts the header manipulation the control plane emits with peer
// metadata, and nothing it would carry out otherwise than Envoy.
func TestParseRouteHeaderMutations(t *testing.T) {
	rc := translatedWithPeer(t).Routes[0]
	tbl, err := parseRouteConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	id, value, _ := fleetPeer.Headers()
	if len(tbl.requestAdd) != 2 || tbl.requestAdd[0] != (headerToSet{"X-Envoy-Peer-Metadata-Id", id}) || tbl.requestAdd[1] != (headerToSet{"X-Envoy-Peer-Metadata", value}) {
		t.Errorf("request_headers_to_add parsed as %v", tbl.requestAdd)
	}
	if strings.Join(tbl.responseRemove, ",") != "X-Envoy-Peer-Metadata-Id,X-Envoy-Peer-Metadata" {
		t.Errorf("response_headers_to_remove parsed as %v", tbl.responseRemove)
	}
	add := func(edit func(*core.HeaderValueOption)) func(*route.RouteConfiguration) {
		return func(r *route.RouteConfiguration) { edit(r.RequestHeadersToAdd[1]) }
	}
	for _, tc := range []struct {
		name string
		edit func(*route.RouteConfiguration)
		want string
	}{
		{"appending", add(func(h *core.HeaderValueOption) { h.AppendAction = core.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD }),
			"request_headers_to_add[1].append_action: APPEND_IF_EXISTS_OR_ADD is not supported; the built-in data plane supports, at route configuration level only, request_headers_to_add with fixed values and append_action OVERWRITE_IF_EXISTS_OR_ADD"},
		{"add if absent", add(func(h *core.HeaderValueOption) { h.AppendAction = core.HeaderValueOption_ADD_IF_ABSENT }),
			"append_action: ADD_IF_ABSENT is not supported"},
		//lint:ignore SA1019 the deprecated field under test
		{"deprecated append", add(func(h *core.HeaderValueOption) { h.Append = wrapperspb.Bool(false) }),
			"request_headers_to_add[1].append: deprecated and not supported"},
		{"formatter", add(func(h *core.HeaderValueOption) { h.Header.Value = "%DOWNSTREAM_REMOTE_ADDRESS%" }),
			`request_headers_to_add[1].header.value: "%DOWNSTREAM_REMOTE_ADDRESS%" holds '%', which Envoy reads as a substitution formatter; only fixed values are supported`},
		{"raw value", add(func(h *core.HeaderValueOption) { h.Header.Value, h.Header.RawValue = "", []byte("x") }),
			"request_headers_to_add[1].header.raw_value: not supported; set value"},
		{"empty value", add(func(h *core.HeaderValueOption) { h.Header.Value = "" }), "request_headers_to_add[1].header.value: empty"},
		{"bad value", add(func(h *core.HeaderValueOption) { h.Header.Value = "a\r\nb: c" }), "request_headers_to_add[1].header.value: not a valid header value"},
		{"host", add(func(h *core.HeaderValueOption) { h.Header.Key = "Host" }), `request_headers_to_add[1].header.key: "Host" cannot be added`},
		{"pseudo-header", add(func(h *core.HeaderValueOption) { h.Header.Key = ":path" }), `header.key: ":path" cannot be added`},
		{"bad response header name", func(r *route.RouteConfiguration) { r.ResponseHeadersToRemove[0] = "a b" },
			`response_headers_to_remove[0]: "a b" is not a header name`},
		{"response headers to add", func(r *route.RouteConfiguration) {
			r.ResponseHeadersToAdd = []*core.HeaderValueOption{{Header: &core.HeaderValue{Key: "x", Value: "y"}}}
		}, "response_headers_to_add and request_headers_to_remove: not supported"},
		{"request headers to remove", func(r *route.RouteConfiguration) { r.RequestHeadersToRemove = []string{"x"} },
			"response_headers_to_add and request_headers_to_remove: not supported"},
		{"on a virtual host", func(r *route.RouteConfiguration) {
			r.VirtualHosts[0].RequestHeadersToAdd, r.RequestHeadersToAdd = r.RequestHeadersToAdd, nil
		}, "virtual_hosts[0] (reviews.default.svc.cluster.local:8080): header manipulation is not supported here"},
		{"on a route", func(r *route.RouteConfiguration) {
			r.VirtualHosts[0].Routes[0].ResponseHeadersToRemove = r.ResponseHeadersToRemove
		}, "routes[0]: header manipulation is not supported here"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := proto.Clone(rc).(*route.RouteConfiguration)
			tc.edit(r)
			_, err := parseRouteConfig(r)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

// With peer metadata, the service behind the mesh sees exactly fwdproxy's, over HTTP/1.1 and
// HTTP/2, whatever the VM forged; the sidecar's answer in kind never reaches the VM. Without it,
// the VM's are removed and none is added.
func TestPeerMetadataReachesTheMeshAsFwdproxysOwn(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	cat := &catalog.Catalog{Services: []catalog.Service{svc}}
	opts := e.options(mesh.addr)
	pm := fleetPeer
	opts.PeerMetadata = &pm
	e.pushApplied(cat, opts, nil)
	// Repeated, and in another case, to defeat a first-value-only removal.
	hdr := forgedPeer.Clone()
	hdr[meshtest.PeerMetadataHeader] = append(hdr[meshtest.PeerMetadataHeader], "second")
	for _, h2 := range []bool{false, true} {
		what := fmt.Sprintf("h2=%v", h2)
		req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/", port), nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = svc.Host
		req.Header = hdr.Clone()
		req.Header["x-envoy-peer-metadata-id"] = []string{"lower-case copy"}
		resp, err := clientFrom(t, "127.0.0.1", h2).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if b := body(t, resp); resp.StatusCode != 200 {
			t.Fatalf("%s: %d %q", what, resp.StatusCode, b)
		}
		checkPeerHeaders(t, what, lastSeen(t, mesh))
		for _, k := range []string{meshtest.PeerMetadataHeader, meshtest.PeerMetadataIDHeader} {
			if v := resp.Header.Values(k); len(v) > 0 {
				t.Errorf("%s: the VM received the sidecar's %s %q", what, k, v)
			}
		}
	}

	e.pushApplied(cat, e.options(mesh.addr), nil)
	c := clientFrom(t, "127.0.0.1", false)
	if code, b := send(t, c, port, svc.Host, "/", forgedPeer); code != 200 {
		t.Fatalf("off: %d %q", code, b)
	}
	got := lastSeen(t, mesh)
	for k := range forgedPeer {
		if v := got.Values(k); len(v) > 0 {
			t.Errorf("off: the mesh received %s %q", k, v)
		}
	}
}

// Envoy 1.40 and the built-in data plane, given the same translated listener and routes with peer
// metadata, send the same peer metadata upstream for a VM that forges it (Envoy removes the VM's
// internal_only_headers in its connection manager, then its router adds fwdproxy's), and both
// keep the service's answer in kind from the VM.
func TestPeerMetadataAsEnvoySendsIt(t *testing.T) {
	e := newEnv(t, 0)
	echo := startEcho(t)
	port, envoyPort := freePort(t), freePort(t)
	svc := reviews(port, catalog.HTTP)
	cat := &catalog.Catalog{Services: []catalog.Service{svc}}
	cl := plainStatic(controlplane.ClusterName(port, "", svc.Host), echo.addr)
	opts := e.options(netip.MustParseAddrPort(echo.addr))
	pm := fleetPeer
	opts.PeerMetadata = &pm
	snap := e.push(cat, opts, func(r *controlplane.Resources) {
		r.Clusters, r.Endpoints = []*clusterpb.Cluster{cl}, nil
	})
	eventually(t, "the data plane to apply the listener, route and cluster", func() bool {
		st := e.dp.Status()
		return st.Ready && st.Versions["listener"] == snap.Cache.GetVersion(resource.ListenerType) &&
			st.Versions["route"] == snap.Cache.GetVersion(resource.RouteType) &&
			st.Versions["cluster"] == snap.Cache.GetVersion(resource.ClusterType)
	})
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	startEnvoy(t, res.Listeners[0], res.Routes[0], cl, envoyPort)

	for _, h2 := range []bool{false, true} {
		c := clientFrom(t, "127.0.0.2", h2)
		for i, p := range []uint32{port, envoyPort} {
			what := fmt.Sprintf("h2=%v %s", h2, []string{"built-in", "Envoy"}[i])
			req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/x", p), nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = svc.Host
			req.Header = forgedPeer.Clone()
			req.Header.Set("X-Case", what)
			resp, err := c.Do(req)
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if b := body(t, resp); resp.StatusCode != 200 {
				t.Fatalf("%s: %d %q", what, resp.StatusCode, b)
			}
			seen := echo.received(what)
			if seen == nil {
				t.Fatalf("%s: the request did not arrive", what)
			}
			checkPeerHeaders(t, what, seen.Header)
			for _, k := range []string{meshtest.PeerMetadataHeader, meshtest.PeerMetadataIDHeader} {
				if v := resp.Header.Values(k); len(v) > 0 {
					t.Errorf("%s: the VM received the service's %s %q", what, k, v)
				}
			}
		}
	}
}

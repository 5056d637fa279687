package dataplane

import (
	"fmt"
	"maps"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	xdsmatcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// clientFrom is an HTTP client whose connections come from the loopback address from; h2 speaks
// HTTP/2 with prior knowledge.
func clientFrom(t testing.TB, from string, h2 bool) *http.Client {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	var c *http.Client
	if h2 {
		c = h2cClient(d.DialContext)
	} else {
		c = &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
	}
	c.Timeout = 10 * time.Second
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// send makes a GET with Host host and the headers hdr to the listener on port.
func send(t testing.TB, c *http.Client, port uint32, host, path string, hdr http.Header) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body(t, resp)
}

// lastSeen is the headers of the last request the mesh server received.
func lastSeen(t testing.TB, m *meshServer) http.Header {
	t.Helper()
	reqs := m.received()
	if len(reqs) == 0 {
		t.Fatal("the mesh server received no request")
	}
	return reqs[len(reqs)-1].header
}

// editHCM returns a mod that edits the HTTP connection manager of every HTTP listener.
func editHCM(t testing.TB, edit func(*hcm.HttpConnectionManager)) func(*controlplane.Resources) {
	return func(r *controlplane.Resources) {
		for _, l := range r.Listeners {
			f := l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1]
			m := &hcm.HttpConnectionManager{}
			if f.GetTypedConfig().UnmarshalTo(m) != nil {
				continue // a TCP proxy
			}
			edit(m)
			a, err := anypb.New(m)
			if err != nil {
				t.Fatal(err)
			}
			f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: a}
		}
	}
}

// forged is what a legacy VM might send to claim a mesh identity or steer the proxy.
var forged = http.Header{
	"X-Forwarded-Client-Cert":                {"By=spiffe://cluster.local/ns/default/sa/reviews;URI=spiffe://cluster.local/ns/payments/sa/admin"},
	"X-Envoy-Upstream-Rq-Timeout-Ms":         {"1"},
	"X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms": {"1"},
	"X-Envoy-Expected-Rq-Timeout-Ms":         {"1"},
	"X-Envoy-Max-Retries":                    {"5"},
	"X-Envoy-Retry-On":                       {"5xx,gateway-error,reset"},
	"X-Envoy-Retriable-Status-Codes":         {"500"},
	"X-Envoy-Hedge-On-Per-Try-Timeout":       {"true"},
	"X-Envoy-Upstream-Stream-Duration-Ms":    {"1"},
	"X-Envoy-Peer-Metadata":                  {"ChwKDkFQUF9DT05UQUlORVJTEgoaCGFkbWluLTA="},
	"X-Envoy-Peer-Metadata-Id":               {"sidecar~10.0.0.9~admin-0.payments~payments.svc.cluster.local"},
	"X-Envoy-Original-Path":                  {"/admin"},
	"X-Envoy-Decorator-Operation":            {"admin.payments.svc.cluster.local:80/*"},
	"X-Envoy-Downstream-Service-Cluster":     {"payments"},
	"X-Envoy-Downstream-Service-Node":        {"admin-0"},
	"X-Envoy-Internal":                       {"true"},
	"X-Envoy-External-Address":               {"10.9.9.9"},
	"X-Envoy-Force-Trace":                    {"true"},
	"X-Envoy-Ip-Tags":                        {"trusted"},
	"X-Request-Id":                           {"00000000-0000-4000-8000-000000000000"},
	"X-Forwarded-Proto":                      {"https"},
}

// A VM cannot claim a mesh identity or steer the proxy with request headers: whatever it forges,
// the service behind the mesh sees none of it (only what fwdproxy sets itself), over HTTP/1.1 and
// HTTP/2, and no forged header changes what the data plane does.
func TestForgedHeadersNeverReachTheMesh(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), nil)
	hdr := forged.Clone()
	hdr.Set("X-Forwarded-For", "10.1.2.3")
	hdr.Set("X-Custom", "kept")

	for _, h2 := range []bool{false, true} {
		c := clientFrom(t, "127.0.0.1", h2)
		if code, b := send(t, c, port, svc.Host, "/", hdr); code != 200 {
			t.Fatalf("h2=%v: %d %q", h2, code, b)
		}
		got := lastSeen(t, mesh)
		for k := range forged {
			switch k {
			case "X-Forwarded-Proto", "X-Envoy-External-Address", "X-Request-Id": // set by the data plane, below
			default:
				if v := got.Values(k); len(v) > 0 {
					t.Errorf("h2=%v: the mesh received the VM's %s: %q", h2, k, v)
				}
			}
		}
		for k, v := range got {
			if strings.HasPrefix(k, "X-Envoy-") && k != "X-Envoy-External-Address" {
				t.Errorf("h2=%v: the mesh received %s: %q", h2, k, v)
			}
		}
		for k, want := range map[string]string{
			"X-Envoy-External-Address": "127.0.0.1", // the VM's own address, not the one it claimed
			"X-Forwarded-Proto":        "http",
			"X-Forwarded-For":          "10.1.2.3,127.0.0.1",
			"X-Custom":                 "kept",
		} {
			if g := strings.Join(got.Values(k), "|"); g != want {
				t.Errorf("h2=%v: %s %q, want %q", h2, k, g, want)
			}
		}
		id := got.Values("X-Request-Id")
		if len(id) != 1 || id[0] == forged.Get("X-Request-Id") || !uuidRE.MatchString(id[0]) {
			t.Fatalf("h2=%v: X-Request-Id %q, want one new random UUID", h2, id)
		}
		// The access log shows the request as it went upstream, as Envoy's does.
		ua := "Go-http-client/1.1"
		if h2 {
			ua = "Go-http-client/2.0"
		}
		if want := fmt.Sprintf(`"10.1.2.3,127.0.0.1" %q %q`, ua, id[0]); !strings.Contains(e.access.String(), want) {
			t.Errorf("h2=%v: the access log lacks %s:\n%s", h2, want, e.access.String())
		}
	}
	if strings.Contains(e.access.String(), forged.Get("X-Request-Id")) {
		t.Errorf("the access log shows the VM's request id:\n%s", e.access.String())
	}

	// The 1ms timeouts did not time out a service that takes 500ms...
	c := clientFrom(t, "127.0.0.1", false)
	if code, b := send(t, c, port, svc.Host, "/slow", forged); code != 200 {
		t.Errorf("slow service with a forged 1ms timeout: %d %q", code, b)
	}
	// ...and the forged retry policy did not retry a failing one.
	if code, _ := send(t, c, port, svc.Host, "/fail", forged); code != http.StatusInternalServerError {
		t.Errorf("failing service: %d, want its 500", code)
	}
	if n := mesh.hits("/fail"); n != 1 {
		t.Errorf("the failing service got %d requests, want 1 (no retry)", n)
	}
}

// Which client Envoy deems internal decides what it may tell the service. The built-in data plane
// follows the same rules for every setting it accepts (each case was checked against Envoy 1.40).
func TestInternalAndExternalRequests(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	cat := &catalog.Catalog{Services: []catalog.Service{svc}}
	sent := http.Header{
		"X-Request-Id":            {"client-request-id"},
		"X-Forwarded-Client-Cert": {"URI=spiffe://cluster.local/ns/payments/sa/admin"},
		"X-Forwarded-Proto":       {"https"},
		"X-Envoy-Max-Retries":     {"5"},
		"X-Envoy-Original-Path":   {"/admin"},
		"X-Envoy-Force-Trace":     {"true"},
		"X-Envoy-Internal":        {"true"},
		"X-Envoy-Attempt-Count":   {"7"},
	}
	withXFF := func(v string) http.Header {
		h := sent.Clone()
		h.Set("X-Forwarded-For", v)
		return h
	}
	type want struct {
		xff, xfp, external, internal string
		keepID, originalPath, xfcc   bool
		forceTrace                   bool
	}
	// An edge request: a client outside the trusted network, as every legacy VM is.
	edge := want{xff: "127.0.0.2", xfp: "http", external: "127.0.0.2"}
	for _, tc := range []struct {
		name string
		edit func(*hcm.HttpConnectionManager)
		from string
		hdr  http.Header
		want want
	}{
		{"as translated: nothing is internal", nil, "127.0.0.1", sent,
			want{xff: "127.0.0.1", xfp: "http", external: "127.0.0.1"}},
		{"no internal_address_config: nothing is internal", func(m *hcm.HttpConnectionManager) {
			m.InternalAddressConfig = nil
		}, "127.0.0.1", sent,
			want{xff: "127.0.0.1", xfp: "http", external: "127.0.0.1"}},
		{"an empty internal_address_config trusts RFC 1918 and 127.0.0.1", func(m *hcm.HttpConnectionManager) {
			m.InternalAddressConfig = &hcm.HttpConnectionManager_InternalAddressConfig{}
		}, "127.0.0.1", sent, want{xff: "127.0.0.1", xfp: "http", internal: "true", keepID: true, originalPath: true, forceTrace: true}},
		{"an empty internal_address_config: 127.0.0.2 is external", func(m *hcm.HttpConnectionManager) {
			m.InternalAddressConfig = &hcm.HttpConnectionManager_InternalAddressConfig{}
		}, "127.0.0.2", sent, edge},
		{"an internal peer that forwards for another client is external", func(m *hcm.HttpConnectionManager) {
			m.InternalAddressConfig = &hcm.HttpConnectionManager_InternalAddressConfig{}
		}, "127.0.0.1", withXFF("10.1.2.3"), want{xff: "10.1.2.3,127.0.0.1", xfp: "http", external: "127.0.0.1"}},
		{"cidr_ranges name the internal addresses", func(m *hcm.HttpConnectionManager) {
			m.InternalAddressConfig = &hcm.HttpConnectionManager_InternalAddressConfig{CidrRanges: []*core.CidrRange{
				{AddressPrefix: "127.0.0.2", PrefixLen: wrapperspb.UInt32(32)}}}
		}, "127.0.0.2", sent, want{xff: "127.0.0.2", xfp: "http", internal: "true", keepID: true, originalPath: true, forceTrace: true}},
		{"preserve_external_request_id", func(m *hcm.HttpConnectionManager) { m.PreserveExternalRequestId = true },
			"127.0.0.2", sent, want{xff: "127.0.0.2", xfp: "http", external: "127.0.0.2", keepID: true}},
		{"ALWAYS_FORWARD_ONLY forwards the client's XFCC", func(m *hcm.HttpConnectionManager) {
			m.ForwardClientCertDetails = hcm.HttpConnectionManager_ALWAYS_FORWARD_ONLY
		}, "127.0.0.2", sent, want{xff: "127.0.0.2", xfp: "http", external: "127.0.0.2", xfcc: true}},
		{"without use_remote_address a request is external but not edge", func(m *hcm.HttpConnectionManager) {
			m.UseRemoteAddress = nil
		}, "127.0.0.2", sent, want{xfp: "https", keepID: true, originalPath: true}},
		{"without use_remote_address one internal X-Forwarded-For address is internal", func(m *hcm.HttpConnectionManager) {
			m.UseRemoteAddress = nil
			m.InternalAddressConfig = &hcm.HttpConnectionManager_InternalAddressConfig{}
		}, "127.0.0.2", withXFF("10.1.2.3"), want{xff: "10.1.2.3", xfp: "https", internal: "true", keepID: true, originalPath: true, forceTrace: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mod func(*controlplane.Resources)
			if tc.edit != nil {
				mod = editHCM(t, tc.edit)
			}
			e.pushApplied(cat, e.options(mesh.addr), mod)
			if code, b := send(t, clientFrom(t, tc.from, false), port, svc.Host, "/", tc.hdr); code != 200 {
				t.Fatalf("%d %q", code, b)
			}
			got := lastSeen(t, mesh)
			w := tc.want
			check := func(name, value string) {
				t.Helper()
				if g := strings.Join(got.Values(name), "|"); g != value {
					t.Errorf("%s: %q, want %q", name, g, value)
				}
			}
			check("X-Forwarded-For", w.xff)
			check("X-Forwarded-Proto", w.xfp)
			check("X-Envoy-External-Address", w.external)
			check("X-Envoy-Internal", w.internal)
			check("X-Envoy-Max-Retries", "")    // the router's: consumed, never forwarded
			check("X-Envoy-Attempt-Count", "7") // Envoy passes on x-envoy-* headers it does not know
			keep := func(name string, kept bool) {
				t.Helper()
				if kept {
					check(name, tc.hdr.Get(name))
				} else {
					check(name, "")
				}
			}
			keep("X-Forwarded-Client-Cert", w.xfcc)
			keep("X-Envoy-Original-Path", w.originalPath)
			keep("X-Envoy-Force-Trace", w.forceTrace)
			if id := got.Get("X-Request-Id"); w.keepID && id != "client-request-id" || !w.keepID && !uuidRE.MatchString(id) {
				t.Errorf("X-Request-Id %q, want the client's: %v", id, w.keepID)
			}
		})
	}
}

// Settings that would make Envoy set or trust headers the built-in data plane does not are
// rejected, naming the field.
func TestParseRejectsUnsupportedHeaderSettings(t *testing.T) {
	dp := New(Options{})
	for _, tc := range []struct {
		name string
		edit func(*hcm.HttpConnectionManager)
		want string
	}{
		{"trusted hops", func(m *hcm.HttpConnectionManager) { m.XffNumTrustedHops = 1 }, "xff_num_trusted_hops: not supported"},
		{"original IP detection", func(m *hcm.HttpConnectionManager) {
			m.OriginalIpDetectionExtensions = []*core.TypedExtensionConfig{{Name: "xff"}}
		}, "original_ip_detection_extensions: not supported"},
		{"x-forwarded-port", func(m *hcm.HttpConnectionManager) { m.AppendXForwardedPort = true }, "append_x_forwarded_port"},
		{"XFCC matcher", func(m *hcm.HttpConnectionManager) {
			m.ForwardClientCertMatcher = &xdsmatcher.Matcher{}
		}, "forward_client_cert_matcher: not supported"},
		{"request ID extension", func(m *hcm.HttpConnectionManager) {
			a, _ := anypb.New(&wrapperspb.StringValue{})
			m.RequestIdExtension = &hcm.RequestIDExtension{TypedConfig: a}
		}, "request_id_extension: google.protobuf.StringValue is not supported"},
		{"internal CIDR", func(m *hcm.HttpConnectionManager) {
			m.InternalAddressConfig = &hcm.HttpConnectionManager_InternalAddressConfig{CidrRanges: []*core.CidrRange{
				{AddressPrefix: "10.0.0.0", PrefixLen: wrapperspb.UInt32(33)}}}
		}, "internal_address_config.cidr_ranges[0]: 10.0.0.0/33 is not a CIDR range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := translated(t)
			editHCM(t, tc.edit)(res)
			i := slices.IndexFunc(res.Listeners, func(l *listener.Listener) bool { return l.Name == "0.0.0.0_8080" })
			_, err := dp.parseListener(res.Listeners[i], "")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
	r := translated(t).Routes[0]
	r.InternalOnlyHeaders = []string{"x-envoy-peer-metadata", "bad header"}
	if _, err := parseRouteConfig(r); err == nil || !strings.Contains(err.Error(), `internal_only_headers[1]: "bad header" is not a header name`) {
		t.Errorf("internal_only_headers: error %v", err)
	}
}

// sanitize deletes header names as they are: they must be canonical.
func TestSanitizedNamesAreCanonical(t *testing.T) {
	for _, list := range [][]string{routerConsumed, externalCleaned, edgeCleaned,
		{hdrXFF, hdrXFP, hdrXFCC, hdrRequestID, hdrEnvoyInternal, hdrExternalAddress}} {
		for _, k := range list {
			if c := http.CanonicalHeaderKey(k); c != k {
				t.Errorf("%q is not canonical (%q)", k, c)
			}
		}
	}
}

// sanitize's one-pass table holds every name of the lists in its own class: a name in two lists
// would be cleaned by the rule of whichever list came last.
func TestSanitizeTableMatchesTheLists(t *testing.T) {
	want := map[string]uint8{hdrEnvoyInternal: cleanAlways, hdrXFCC: cleanXFCC}
	for _, l := range []struct {
		class uint8
		names []string
	}{{cleanAlways, routerConsumed}, {cleanExternal, externalCleaned}, {cleanEdge, edgeCleaned}} {
		for _, k := range l.names {
			if c, dup := want[k]; dup {
				t.Errorf("%q is in two lists (classes %d and %d)", k, c, l.class)
			}
			want[k] = l.class
		}
	}
	if !maps.Equal(cleanedClass, want) {
		t.Errorf("cleanedClass = %v, want %v", cleanedClass, want)
	}
}

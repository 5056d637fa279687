package dataplane

import (
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

func TestHTTPByHostAndAlias(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	ratings := catalog.Service{Host: "ratings.default.svc.cluster.local", Ports: []catalog.Port{{Number: port, Protocol: catalog.HTTP}},
		Identities: []string{"spiffe://cluster.local/ns/default/sa/ratings"}}
	cat := &catalog.Catalog{Services: []catalog.Service{reviews(port, catalog.HTTP, "reviews.example.com"), ratings}}
	e.pushApplied(cat, e.options(mesh.addr), nil)

	c := &http.Client{}
	for _, host := range []string{"reviews.default.svc.cluster.local", "reviews.example.com", fmt.Sprintf("reviews.example.com:%d", port), "Reviews.Default.svc.cluster.local"} {
		resp := get(t, c, port, host, "/a?b=c")
		if got := body(t, resp); resp.StatusCode != 200 || got != "hello /a " {
			t.Fatalf("Host %s: %d %q", host, resp.StatusCode, got)
		}
		if sni := resp.Header.Get("X-Seen-Sni"); sni != fmt.Sprintf("outbound_.%d_._.reviews.default.svc.cluster.local", port) {
			t.Errorf("SNI %q", sni)
		}
		if host := resp.Header.Get("X-Seen-Host"); !strings.EqualFold(host, host) {
			t.Errorf("upstream saw Host %q", host)
		}
		if got := resp.Header.Get("X-Seen-Client"); got != fleetID {
			t.Errorf("client identity %q", got)
		}
		if got := resp.Header.Get("X-Seen-Proto"); got != "HTTP/1.1" {
			t.Errorf("upstream protocol %q", got)
		}
		if got := resp.Header.Get("X-Seen-Xff"); got != "127.0.0.1" {
			t.Errorf("X-Forwarded-For %q", got)
		}
		if len(resp.Header.Get("X-Seen-Request-Id")) != 36 {
			t.Errorf("X-Request-Id %q", resp.Header.Get("X-Seen-Request-Id"))
		}
	}
	h, _ := mesh.last()
	if !slices.Equal(h.alpn, controlplane.ALPNHTTP11) {
		t.Errorf("ALPN offered %q, want %q", h.alpn, controlplane.ALPNHTTP11)
	}
	// The client's X-Forwarded-For is kept and the peer appended, comma-separated without a space
	// as Envoy writes it; hop-by-hop headers dropped.
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/post", port), strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "reviews.example.com"
	req.Header.Set("X-Forwarded-For", "10.1.2.3")
	req.Header.Set("Connection", "keep-alive, X-Private")
	req.Header.Set("X-Private", "secret")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if got := body(t, resp); got != "hello /post payload" {
		t.Errorf("POST body %q", got)
	}
	if got := resp.Header.Get("X-Seen-Private"); got != "" {
		t.Errorf("a header named in Connection was forwarded: %q", got)
	}
	if got := resp.Header.Get("X-Seen-Xff"); got != "10.1.2.3,127.0.0.1" {
		t.Errorf("X-Forwarded-For %q", got)
	}
	// The other service on the same port has its own cluster (and identity, which this mesh
	// server does not have: the data plane refuses it).
	resp = get(t, c, port, "ratings.default.svc.cluster.local", "/")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("ratings with the wrong server identity: %d", resp.StatusCode)
	}
	body(t, resp)
	// Unknown Host: 404 like Envoy.
	resp = get(t, c, port, "unknown.example.com", "/")
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown host: %d", resp.StatusCode)
	}
	body(t, resp)
	cluster := controlplane.ClusterName(port, "", "reviews.default.svc.cluster.local")
	if n := counter(t, e.dp.metrics.requests.WithLabelValues(cluster, "200")); n != 5 {
		t.Errorf("requests_total{200} = %v, want 5", n)
	}
	if !strings.Contains(e.access.String(), `"GET /a?b=c HTTP/1.1" 200 - 0 9 `) {
		t.Errorf("access log lacks the request line:\n%s", e.access.String())
	}
	if !strings.Contains(e.access.String(), `"GET / HTTP/1.1" 404 NR `) {
		t.Errorf("access log lacks the 404:\n%s", e.access.String())
	}
}

func TestHTTP2PortAndH2CDownstream(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	cat := &catalog.Catalog{Services: []catalog.Service{reviews(port, catalog.GRPC)}}
	e.pushApplied(cat, e.options(mesh.addr), nil)
	// HTTP/2 with prior knowledge downstream (codec AUTO), HTTP/2 over mTLS upstream.
	h2c := h2cClient((&net.Dialer{}).DialContext)
	for _, c := range []*http.Client{h2c, {}} {
		resp := get(t, c, port, "reviews.default.svc.cluster.local", "/grpc.Service/Method")
		if got := body(t, resp); resp.StatusCode != 200 || got != "hello /grpc.Service/Method " {
			t.Fatalf("%d %q", resp.StatusCode, got)
		}
		if got := resp.Header.Get("X-Seen-Proto"); got != "HTTP/2.0" {
			t.Errorf("upstream protocol %q, want HTTP/2.0", got)
		}
	}
	h, _ := mesh.last()
	if !slices.Equal(h.alpn, controlplane.ALPNH2) {
		t.Errorf("ALPN offered %q, want %q", h.alpn, controlplane.ALPNH2)
	}
}

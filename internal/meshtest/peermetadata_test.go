package meshtest

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// checkPeerMetadata sends requests through c with and without Istio's peer metadata headers and
// checks the sidecar did what Istio's inbound filter does: it decoded the caller's workload,
// kept both headers from the application, and answered with its own, only when asked.
func checkPeerMetadata(t *testing.T, c *http.Client, url, host string) {
	t.Helper()
	// A value with '+' and '/', which a report must escape (the cluster ID varies until it has).
	var value string
	for i := 0; !strings.Contains(value, "+") || !strings.Contains(value, "/"); i++ {
		v, err := PeerMetadataValue(map[string]string{"NAME": "vm-fleet-0", "NAMESPACE": "legacy", "WORKLOAD_NAME": "vm-fleet",
			"CLUSTER_ID": strings.Repeat("~?>", i)})
		if err != nil || i > 100 {
			t.Fatalf("no value with '+' and '/': %v", err)
		}
		value = v
	}
	id := "sidecar~0.0.0.0~vm-fleet-0.legacy~legacy.svc.cluster.local"
	for _, tc := range []struct {
		name string
		hdr  http.Header
	}{
		{"with", http.Header{PeerMetadataIDHeader: {id}, PeerMetadataHeader: {value}}},
		{"without", nil},
	} {
		req, err := http.NewRequest("GET", url, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		for k, v := range tc.hdr {
			req.Header[k] = v
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		r, err := ParseReport(string(body))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if len(r.Headers) == 0 {
			t.Fatalf("%s: the report names no headers the application received", tc.name)
		}
		for _, h := range r.Headers {
			if strings.HasPrefix(h, "x-envoy-peer-metadata") {
				t.Errorf("%s: the application received %s", tc.name, h)
			}
		}
		ownID, own := resp.Header.Get(PeerMetadataIDHeader), resp.Header.Get(PeerMetadataHeader)
		if tc.hdr == nil {
			if r.Peer != "" || r.PeerID != "" || r.PeerMetadata != nil || ownID != "" || own != "" {
				t.Errorf("without: peer %q, id %q, metadata %v; answered %q %q", r.Peer, r.PeerID, r.PeerMetadata, ownID, own)
			}
			continue
		}
		if r.Peer != "vm-fleet.legacy" || r.PeerID != id || r.PeerMetadata == nil || r.PeerMetadata.Instance != "vm-fleet-0" {
			t.Errorf("with: peer %q, id %q, metadata %+v", r.Peer, r.PeerID, r.PeerMetadata)
		}
		p, err := DecodePeerMetadata(own)
		if err != nil || p.Workload != r.Service || p.Namespace != "bookinfo" || !strings.HasPrefix(ownID, "sidecar~") {
			t.Errorf("with: the sidecar answered %q (%+v, %v) and id %q, want its own workload", own, p, err, ownID)
		}
	}
}

func TestHTTPSidecarPeerMetadata(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	f.sidecar(t, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, Protocol: HTTP}, target)
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio-http/1.1"}, productpageID)
	if err != nil {
		t.Fatal(err)
	}
	c := MeshHTTPClient(f.gw.Addr(), conf, false)
	defer c.CloseIdleConnections()
	checkPeerMetadata(t, c, "http://productpage/", target.Host)
}

func TestDecodePeerMetadata(t *testing.T) {
	// A header as Istio 1.2x sidecars send it (LABELS holding the canonical names), padded or not.
	v, err := PeerMetadataValue(map[string]string{"WORKLOAD_NAME": "reviews-v1", "NAMESPACE": "bookinfo", "CLUSTER_ID": "Kubernetes",
		"OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{v, strings.TrimRight(v, "=")} {
		p, err := DecodePeerMetadata(s)
		if err != nil || p.String() != "reviews-v1.bookinfo" || p.Cluster != "Kubernetes" || !strings.HasSuffix(p.Owner, "/deployments/reviews-v1") {
			t.Errorf("%q: %+v, %v", s, p, err)
		}
	}
	for _, bad := range []string{"not base64!", "AAAA"} { // AAAA: three zero bytes, no protobuf
		if _, err := DecodePeerMetadata(bad); err == nil {
			t.Errorf("%q decoded", bad)
		}
	}
}

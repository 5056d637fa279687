package dataplane

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// The inbound listener and VM clusters the control plane translates parse, with their chains
// by SNI, RBAC on principals, XFCC and health checks.
func TestParseInboundFromTranslation(t *testing.T) {
	res, err := controlplane.Translate(&catalog.Catalog{}, controlplane.Options{
		ListenAddress: "127.0.0.1", AccessLog: true,
		Reverse: &controlplane.Reverse{
			Address: "127.0.0.1", Port: 15443, TrustDomain: "cluster.local", ConnectTimeout: time.Second,
			HealthCheck: controlplane.HealthCheck{Interval: time.Second, Timeout: time.Second, UnhealthyThreshold: 2, HealthyThreshold: 1},
			Services: []controlplane.ReverseService{
				{Host: "billing.vm.example.internal", Aliases: []string{"billing.legacy.internal"},
					Ports:    []controlplane.ReversePort{{Number: 8080, TargetPort: 80, Protocol: catalog.HTTP, HealthCheckPath: "/healthz"}},
					Backends: []controlplane.Backend{{Host: "10.0.1.5"}}, Principals: []string{"spiffe://cluster.local/ns/shop/sa/frontend"}},
				{Host: "ldap.vm.example.internal", Ports: []controlplane.ReversePort{{Number: 389, TargetPort: 389, Protocol: catalog.TCP}},
					Backends: []controlplane.Backend{{Host: "ldap1.vm.example.internal"}}},
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	dp := New(Options{})
	cfg, err := dp.parseListener(res.Listeners[0], "")
	if err != nil {
		t.Fatal(err)
	}
	ib := cfg.inbound
	if ib == nil || len(ib.chains) != 3 {
		t.Fatalf("inbound chains: %+v", ib)
	}
	h := ib.chains["outbound_.8080_._.billing.legacy.internal"]
	if h == nil || h.service != "billing.vm.example.internal:8080" || h.cfg.http == nil || !h.require || h.xfcc == nil ||
		!slices.Equal(h.tls.alpn, []string{"h2", "http/1.1"}) || len(h.logs) != 1 {
		t.Fatalf("HTTP chain: %+v", h)
	}
	front := peerID{uris: []string{"spiffe://cluster.local/ns/shop/sa/frontend"}}
	other := peerID{uris: []string{"spiffe://cluster.local/ns/shop/sa/other"}}
	if eng := h.cfg.http.rbac.engine; !eng.allowedPeer(front) || eng.allowedPeer(other) || eng.allowedPeer(peerID{}) {
		t.Error("HTTP RBAC does not decide on the principal")
	}
	tc := ib.chains["outbound_.389_._.ldap.vm.example.internal"]
	if tc == nil || tc.cfg.tcp == nil || tc.rbac.allowedPeer(front) || len(tc.tls.alpn) != 0 {
		t.Fatalf("TCP chain (no principal allowed): %+v", tc)
	}
	if names := cfg.secretNames(); !slices.Contains(names, "default") || !slices.Contains(names, "ROOTCA") {
		t.Errorf("secrets wanted: %v", names)
	}
	if len(res.Clusters) != 2 {
		t.Fatalf("%d inbound clusters, want billing's and ldap's", len(res.Clusters))
	}
	for _, c := range res.Clusters {
		cc, err := dp.parseCluster(c)
		if err != nil {
			t.Fatalf("cluster %s: %v", c.Name, err)
		}
		if cc.health == nil {
			t.Errorf("cluster %s: no health check", c.Name)
		}
		if strings.Contains(c.Name, "ldap") && (len(cc.dns) != 1 || cc.dns[0].host != "ldap1.vm.example.internal") {
			t.Errorf("DNS cluster targets %+v", cc.dns)
		}
		if strings.Contains(c.Name, "billing") && cc.health.httpPath != "/healthz" {
			t.Errorf("HTTP health check %+v", cc.health)
		}
	}
}

func TestSelectALPNAsEnvoy(t *testing.T) {
	server := []string{"h2", "http/1.1"}
	for _, tc := range []struct {
		client []string
		want   []string
	}{
		{[]string{"istio-http/1.1", "istio", "http/1.1"}, []string{"http/1.1"}},
		{[]string{"istio-h2", "istio", "h2"}, []string{"h2"}},
		{[]string{"istio-peer-exchange", "istio"}, nil}, // no overlap: no ALPN, the handshake goes on
	} {
		if got := selectALPN(server, tc.client); !slices.Equal(got, tc.want) {
			t.Errorf("client %v: %v, want %v", tc.client, got, tc.want)
		}
	}
}

func TestXFCCInEnvoysFormat(t *testing.T) {
	u, _ := url.Parse("spiffe://cluster.local/ns/shop/sa/frontend")
	leaf := &x509.Certificate{Raw: []byte("der"), URIs: []*url.URL{u}}
	cs := tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}
	got := xfccValue(&hcm.HttpConnectionManager_SetCurrentClientCertDetails{Subject: wrapperspb.Bool(true), Uri: true}, cs,
		[]string{"spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"})
	sum := sha256.Sum256([]byte("der"))
	want := `By=spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy;Hash=` + hex.EncodeToString(sum[:]) + `;Subject="";URI=spiffe://cluster.local/ns/shop/sa/frontend`
	if got != want {
		t.Errorf("XFCC %q, want %q", got, want)
	}
	if s := serviceOfSNI("outbound_.5432_._.ledger.vm.example.internal"); s != "ledger.vm.example.internal:5432" {
		t.Errorf("serviceOfSNI: %q", s)
	}
}

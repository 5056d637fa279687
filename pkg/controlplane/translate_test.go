package controlplane

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata/out")

// goldenInput is one testdata/in case: translation options and a catalog.
type goldenInput struct {
	ListenAddress string `yaml:"listenAddress"`
	AccessLog     *bool  `yaml:"accessLog"`
	Gateways      []struct {
		Name      string   `yaml:"name"`
		Network   string   `yaml:"network"`
		Addresses []string `yaml:"addresses"`
	} `yaml:"gateways"`
	Catalog yaml.Node `yaml:"catalog"`
}

func loadGolden(t *testing.T, path string) (*catalog.Catalog, Options) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var in goldenInput
	if err := yaml.Unmarshal(data, &in); err != nil {
		t.Fatal(err)
	}
	catYAML, err := yaml.Marshal(&in.Catalog)
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{
		ListenAddress:  in.ListenAddress,
		ConnectTimeout: 5 * time.Second,
		Outlier:        Outlier{ConsecutiveErrors: 5, Interval: 10 * time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
		AccessLog:      in.AccessLog == nil || *in.AccessLog,
	}
	var names []string
	for _, g := range in.Gateways {
		gw := Gateway{Name: g.Name, Network: g.Network}
		for _, a := range g.Addresses {
			gw.Addresses = append(gw.Addresses, netip.MustParseAddrPort(a))
		}
		opts.Gateways = append(opts.Gateways, gw)
		names = append(names, g.Name)
	}
	cat, err := catalog.Parse(path, catYAML, catalog.Options{Gateways: names})
	if err != nil {
		t.Fatal(err)
	}
	return cat, opts
}

// TestGolden pins the exact Envoy JSON for each testdata/in case. Review changes to
// testdata/out by eye; regenerate with: go test ./pkg/controlplane -run TestGolden -update
func TestGolden(t *testing.T) {
	inputs, _ := filepath.Glob("testdata/in/*.yaml")
	if len(inputs) == 0 {
		t.Fatal("no golden inputs")
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".yaml")
		t.Run(name, func(t *testing.T) {
			cat, opts := loadGolden(t, in)
			res, err := Translate(cat, opts)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := NewSnapshot(res, nil); err != nil {
				t.Fatalf("snapshot invalid: %v", err)
			}
			got, err := RenderJSON(res, nil)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			out := filepath.Join("testdata/out", name+".json")
			if *update {
				if err := os.WriteFile(out, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(out)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the translation; if the change is intended, run with -update and review the diff", out)
			}
		})
	}
}

func TestIstioWireConventions(t *testing.T) {
	if got := SNI(9080, "", "reviews.default.svc.cluster.local"); got != "outbound_.9080_._.reviews.default.svc.cluster.local" {
		t.Errorf("SNI = %q", got)
	}
	if got := SNI(9080, "v2", "reviews.default.svc.cluster.local"); got != "outbound_.9080_.v2_.reviews.default.svc.cluster.local" {
		t.Errorf("subset SNI = %q", got)
	}
	if got := ClusterName(9080, "", "reviews.default.svc.cluster.local"); got != "outbound|9080||reviews.default.svc.cluster.local" {
		t.Errorf("cluster name = %q", got)
	}

	cat, opts := loadGolden(t, "testdata/in/bookinfo.yaml")
	res, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	clusters := map[string]*cluster.Cluster{}
	for _, c := range res.Clusters {
		clusters[c.Name] = c
	}
	want := []struct {
		cluster, sni string
		alpn         []string
		sans         []string
		h2           bool
	}{
		{"outbound|9080||productpage.bookinfo.svc.cluster.local", "outbound_.9080_._.productpage.bookinfo.svc.cluster.local", []string{"istio-http/1.1"}, []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"}, false},
		{"outbound|9080|v2|reviews.bookinfo.svc.cluster.local", "outbound_.9080_.v2_.reviews.bookinfo.svc.cluster.local", []string{"istio-http/1.1"}, []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"}, false},
		{"outbound|50051||ratings.bookinfo.svc.cluster.local", "outbound_.50051_._.ratings.bookinfo.svc.cluster.local", []string{"istio-h2"}, []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"}, true},
		{"outbound|3306||mysql.bookinfo.svc.cluster.local", "outbound_.3306_._.mysql.bookinfo.svc.cluster.local", []string{"istio-peer-exchange", "istio"}, []string{"spiffe://cluster.local/ns/bookinfo/sa/mysql", "spiffe://cluster.local/ns/bookinfo/sa/mysql-replica"}, false},
	}
	for _, w := range want {
		c := clusters[w.cluster]
		if c == nil {
			t.Errorf("cluster %s missing", w.cluster)
			continue
		}
		tc := &tlsv3.UpstreamTlsContext{}
		if err := c.TransportSocket.GetTypedConfig().UnmarshalTo(tc); err != nil {
			t.Fatal(err)
		}
		if tc.Sni != w.sni {
			t.Errorf("%s: SNI %q, want %q", w.cluster, tc.Sni, w.sni)
		}
		if strings.Join(tc.CommonTlsContext.AlpnProtocols, ",") != strings.Join(w.alpn, ",") {
			t.Errorf("%s: ALPN %v, want %v", w.cluster, tc.CommonTlsContext.AlpnProtocols, w.alpn)
		}
		cv := tc.CommonTlsContext.GetCombinedValidationContext()
		var sans []string
		for _, m := range cv.GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
			if m.SanType != tlsv3.SubjectAltNameMatcher_URI {
				t.Errorf("%s: SAN type %v, want URI", w.cluster, m.SanType)
			}
			sans = append(sans, m.GetMatcher().GetExact())
		}
		if strings.Join(sans, ",") != strings.Join(w.sans, ",") {
			t.Errorf("%s: SANs %v, want %v", w.cluster, sans, w.sans)
		}
		if cv.GetValidationContextSdsSecretConfig().GetName() != "ROOTCA" || tc.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].Name != "default" {
			t.Errorf("%s: SDS secret names are not Istio's default/ROOTCA", w.cluster)
		}
		_, hasH2 := c.TypedExtensionProtocolOptions[HTTPProtocolOptionsKey]
		if w.h2 && (!hasH2 || !strings.Contains(c.TypedExtensionProtocolOptions[HTTPProtocolOptionsKey].String(), "http2")) {
			t.Errorf("%s: expected HTTP/2 upstream", w.cluster)
		}
	}
	// ratings is restricted to eastwest-a: one endpoint; the others reach all three addresses.
	for _, e := range res.Endpoints {
		n := len(e.Endpoints[0].LbEndpoints)
		if strings.Contains(e.ClusterName, "ratings") && n != 1 || !strings.Contains(e.ClusterName, "ratings") && n != 3 {
			t.Errorf("%s has %d endpoints", e.ClusterName, n)
		}
	}
	// HTTP port 9080 serves three virtual hosts; the TCP listener proxies to mysql.
	for _, l := range res.Listeners {
		f := l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1]
		switch l.Name {
		case "0.0.0.0_9080":
			m := &hcm.HttpConnectionManager{}
			if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
				t.Fatal(err)
			}
			if m.GetRds().GetRouteConfigName() != "9080" || len(m.HttpFilters) != 2 {
				t.Errorf("9080 listener: rds %q, %d filters", m.GetRds().GetRouteConfigName(), len(m.HttpFilters))
			}
		case "0.0.0.0_3306":
			tp := &tcpproxy.TcpProxy{}
			if err := f.GetTypedConfig().UnmarshalTo(tp); err != nil {
				t.Fatal(err)
			}
			if tp.GetCluster() != "outbound|3306||mysql.bookinfo.svc.cluster.local" {
				t.Errorf("3306 proxies to %q", tp.GetCluster())
			}
			if tp.GetMaxConnectAttempts().GetValue() != 2 {
				t.Errorf("3306: max_connect_attempts %v, want 2 (a refused gateway is not the end)", tp.GetMaxConnectAttempts())
			}
			// Allowed clients: matched by the chain on the source address, so a refused client
			// is closed before anything connects upstream (Envoy's network RBAC decides only on
			// the first byte, too late for server-first protocols).
			m := l.FilterChains[0].GetFilterChainMatch()
			if len(m.GetSourcePrefixRanges()) == 0 || len(l.FilterChains) != 1 || len(l.FilterChains[0].Filters) != 2 {
				t.Errorf("3306: filter chain match %v with %d chains and %d filters; want one chain matching the allowed clients' source ranges", m, len(l.FilterChains), len(l.FilterChains[0].Filters))
			}
		}
		// Every listener first limits its connections (listen.maxConnections).
		cl := &connlimit.ConnectionLimit{}
		if err := l.FilterChains[0].Filters[0].GetTypedConfig().UnmarshalTo(cl); err != nil || cl.GetMaxConnections().GetValue() != DefaultMaxConnections || cl.GetStatPrefix() != l.Name {
			t.Errorf("%s: first filter %v (%v), want the connection limit", l.Name, l.FilterChains[0].Filters[0], err)
		}
	}
	for _, r := range res.Routes {
		if r.Name != "9080" {
			continue
		}
		var domains []string
		for _, vh := range r.VirtualHosts {
			domains = append(domains, vh.Domains...)
		}
		joined := strings.Join(domains, " ")
		for _, d := range []string{"productpage.example.internal", "productpage.bookinfo.svc.cluster.local:9080", "reviews-v2.example.internal:9080"} {
			if !strings.Contains(joined, d) {
				t.Errorf("route 9080 lacks domain %s", d)
			}
		}
	}
}

func TestVersionIsContentHash(t *testing.T) {
	cat, opts := loadGolden(t, "testdata/in/bookinfo.yaml")
	res1, _ := Translate(cat, opts)
	// The same catalog in another order translates to the same version.
	rev := &catalog.Catalog{}
	for i := len(cat.Services) - 1; i >= 0; i-- {
		rev.Services = append(rev.Services, cat.Services[i])
	}
	rev.Normalize()
	res2, _ := Translate(rev, opts)
	s1, err := NewSnapshot(res1, nil)
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := NewSnapshot(res2, nil)
	if s1.ConfigVersion != s2.ConfigVersion || len(s1.ConfigVersion) != 16 {
		t.Fatalf("versions %q and %q", s1.ConfigVersion, s2.ConfigVersion)
	}
	cat.Services[0].Ports[0].Number = 9999
	res3, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	s3, _ := NewSnapshot(res3, nil)
	if s3.ConfigVersion == s1.ConfigVersion {
		t.Fatal("a catalog change kept the version")
	}
}

func TestInvalidResourceIsNotServed(t *testing.T) {
	cat, opts := loadGolden(t, "testdata/in/minimal-tcp.yaml")
	res, _ := Translate(cat, opts)
	// A typed config nested in an Any must be validated too: empty the tcp_proxy's stat prefix.
	l := res.Listeners[0]
	f := l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1]
	tp := &tcpproxy.TcpProxy{}
	_ = f.GetTypedConfig().UnmarshalTo(tp)
	tp.StatPrefix = ""
	f.GetTypedConfig().Value, _ = protoMarshal(tp)
	_, err := NewSnapshot(res, nil)
	if err == nil || !strings.Contains(err.Error(), "StatPrefix") || !strings.Contains(err.Error(), l.Name) {
		t.Fatalf("invalid nested config accepted or error unclear: %v", err)
	}
	// A cluster that refers to endpoints that are missing is inconsistent.
	res, _ = Translate(cat, opts)
	res.Endpoints = nil
	if _, err := NewSnapshot(res, nil); err == nil {
		t.Fatal("snapshot without endpoints accepted")
	}
}

func TestTranslateRefusesConflicts(t *testing.T) {
	cat := &catalog.Catalog{Services: []catalog.Service{
		{Host: "a.ns.svc.cluster.local", Ports: []catalog.Port{{Number: 80, Protocol: catalog.TCP}}, Identities: []string{"spiffe://cluster.local/ns/ns/sa/a"}},
		{Host: "b.ns.svc.cluster.local", Ports: []catalog.Port{{Number: 80, Protocol: catalog.HTTP}}, Identities: []string{"spiffe://cluster.local/ns/ns/sa/b"}},
	}}
	_, err := Translate(cat, Options{ListenAddress: "0.0.0.0", Gateways: []Gateway{{Name: "gw", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:15443")}}}})
	if err == nil || !strings.Contains(err.Error(), "port 80") {
		t.Fatalf("err = %v", err)
	}
}
func protoMarshal(m proto.Message) ([]byte, error) { return proto.Marshal(m) }

func TestBuilderStillValidatesChangedResources(t *testing.T) {
	cat, opts := loadGolden(t, "testdata/in/minimal-tcp.yaml")
	var b Builder
	res, _ := Translate(cat, opts)
	s1, err := b.Build(res, nil)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := Translate(cat, opts)
	s2, err := b.Build(again, nil)
	if err != nil || s2.ConfigVersion != s1.ConfigVersion {
		t.Fatalf("rebuild: %v, versions %s %s", err, s1.ConfigVersion, s2.ConfigVersion)
	}
	// A changed, invalid resource is caught although its name was validated before.
	again.Clusters[0].ConnectTimeout.Seconds = -1
	if _, err := b.Build(again, nil); err == nil || !strings.Contains(err.Error(), "ConnectTimeout") {
		t.Fatalf("invalid changed cluster accepted: %v", err)
	}
}

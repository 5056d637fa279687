package controlplane

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

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
		{"outbound|3306||mysql.bookinfo.svc.cluster.local", "outbound_.3306_._.mysql.bookinfo.svc.cluster.local", []string{"istio"}, []string{"spiffe://cluster.local/ns/bookinfo/sa/mysql", "spiffe://cluster.local/ns/bookinfo/sa/mysql-replica"}, false},
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
		if err := l.FilterChains[0].Filters[0].GetTypedConfig().UnmarshalTo(cl); err != nil || cl.GetMaxConnections().GetValue() != DefaultMaxConnections || cl.GetStatPrefix() != StatPrefix(l.Address.GetSocketAddress().GetPortValue()) {
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

// Every HTTP listener treats every client as external, so that nothing a VM sends can claim a
// mesh identity or steer the proxy: Envoy then drops its XFCC and x-envoy-* control headers and
// replaces its x-request-id.
func TestHTTPListenersTrustNoClientHeader(t *testing.T) {
	cat, opts := loadGolden(t, "testdata/in/bookinfo.yaml")
	res, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range res.Listeners {
		m := &hcm.HttpConnectionManager{}
		if l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1].GetTypedConfig().UnmarshalTo(m) != nil {
			continue // a TCP proxy
		}
		n++
		if m.ForwardClientCertDetails != hcm.HttpConnectionManager_SANITIZE {
			t.Errorf("%s: forward_client_cert_details %v, want SANITIZE", l.Name, m.ForwardClientCertDetails)
		}
		if !m.GetUseRemoteAddress().GetValue() || m.XffNumTrustedHops != 0 || m.SkipXffAppend || len(m.OriginalIpDetectionExtensions) > 0 {
			t.Errorf("%s: the client's address is not the one trusted (use_remote_address %v, xff_num_trusted_hops %d, skip_xff_append %v)",
				l.Name, m.GetUseRemoteAddress(), m.XffNumTrustedHops, m.SkipXffAppend)
		}
		if !m.GetGenerateRequestId().GetValue() || m.PreserveExternalRequestId {
			t.Errorf("%s: a client's x-request-id is kept", l.Name)
		}
		// An explicit list, never an empty one: Envoy 1.40 deems RFC 1918 and 127.0.0.1 internal
		// when internal_address_config has no cidr_ranges.
		iac := m.GetInternalAddressConfig()
		if iac == nil || len(iac.CidrRanges) == 0 || iac.UnixSockets {
			t.Fatalf("%s: internal_address_config %v, want cidr_ranges that match no client", l.Name, iac)
		}
		for _, c := range iac.CidrRanges {
			pfx := netip.PrefixFrom(netip.MustParseAddr(c.AddressPrefix), int(c.GetPrefixLen().GetValue()))
			if !pfx.Addr().IsUnspecified() || pfx.Bits() != pfx.Addr().BitLen() {
				t.Errorf("%s: internal CIDR %s could match a client", l.Name, pfx)
			}
		}
	}
	if n != 2 {
		t.Errorf("%d HTTP listeners, want 2", n)
	}
	for _, r := range res.Routes {
		for _, h := range []string{"x-envoy-peer-metadata", "x-envoy-peer-metadata-id"} {
			if !slices.Contains(r.InternalOnlyHeaders, h) {
				t.Errorf("route %s: internal_only_headers %v lacks %s", r.Name, r.InternalOnlyHeaders, h)
			}
		}
	}
}

// TestStatNamesHaveNoDots: Envoy's Prometheus output cuts a cluster name, a connection manager's
// or TCP proxy's stat prefix at the first dot (the rest lands in the metric name), so every name
// statistics are emitted under is dot-free and still tells the resources apart.
func TestStatNamesHaveNoDots(t *testing.T) {
	for _, in := range validGoldenInputs(t) {
		cat, opts := loadGolden(t, in)
		res, err := Translate(cat, opts)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, c := range res.Clusters {
			if strings.Contains(c.AltStatName, ".") || c.AltStatName != ClusterStatName(c.Name) || seen[c.AltStatName] {
				t.Errorf("%s: cluster %s: alt_stat_name %q", in, c.Name, c.AltStatName)
			}
			seen[c.AltStatName] = true
		}
		for _, l := range res.Listeners {
			for _, fc := range l.FilterChains {
				want := StatPrefix(l.Address.GetSocketAddress().GetPortValue())
				if strings.HasPrefix(l.Name, "inbound_") {
					// The inbound listener's chains are named by SNI, outbound_.PORT_._.HOST.
					port, host, ok := strings.Cut(strings.TrimPrefix(fc.Name, "outbound_."), "_._.")
					n, err := strconv.Atoi(port)
					if !ok || err != nil {
						t.Fatalf("%s: inbound chain %q is not named by SNI", in, fc.Name)
					}
					want = InboundStatPrefix(uint32(n), host)
				}
				for _, f := range fc.Filters {
					m, err := f.GetTypedConfig().UnmarshalNew()
					if err != nil {
						t.Fatal(err)
					}
					prefix := m.(interface{ GetStatPrefix() string }).GetStatPrefix()
					want := want
					if f.Name == NetworkRBACFilter {
						want = "tcp." + want + "."
					}
					if prefix != want || strings.Contains(strings.TrimSuffix(strings.TrimPrefix(prefix, "tcp."), "."), ".") || seen[f.Name+prefix] {
						t.Errorf("%s: listener %s filter %s: stat prefix %q, want %q", in, l.Name, f.Name, prefix, want)
					}
					seen[f.Name+prefix] = true
				}
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
	cat.Services[0].Ports = slices.Clone(cat.Services[0].Ports)
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

// TestTranslateLeavesOutWhatItCannotPlace: one service that cannot be placed is left out with
// its reason; the rest is translated, and the same inputs give the same resources and the same
// list on every peer, whatever order the catalog came in.
func TestTranslateLeavesOutWhatItCannotPlace(t *testing.T) {
	svc := func(host string, port uint32, proto catalog.Protocol, gateways ...string) catalog.Service {
		return catalog.Service{Host: host, Ports: []catalog.Port{{Number: port, Protocol: proto}}, Identities: []string{"spiffe://cluster.local/ns/ns/sa/x"}, Gateways: gateways}
	}
	cat := &catalog.Catalog{Services: []catalog.Service{
		svc("a.ns.svc.cluster.local", 80, catalog.TCP),
		svc("b.ns.svc.cluster.local", 80, catalog.HTTP),
		svc("c.ns.svc.cluster.local", 81, catalog.HTTP, "pending"),
		svc("d.ns.svc.cluster.local", 82, catalog.HTTP),
	}}
	_, opts := loadGolden(t, "testdata/in/minimal-tcp.yaml")
	opts.ListenAddress = "0.0.0.0"
	res, err := Translate(cat, opts)
	if err != nil {
		t.Fatalf("one unplaceable service failed the whole translation: %v", err)
	}
	var listeners []string
	for _, l := range res.Listeners {
		listeners = append(listeners, l.Name)
	}
	if strings.Join(listeners, " ") != "0.0.0.0_80 0.0.0.0_82" {
		t.Errorf("listeners %v; want a's TCP port 80 and d's HTTP port 82", listeners)
	}
	if len(res.Skipped) != 2 {
		t.Fatalf("skipped %+v", res.Skipped)
	}
	if s := res.Skipped[0]; s.Host != "b.ns.svc.cluster.local" || s.Reason != SkipConflict || !strings.Contains(s.Detail, "port 80") || !strings.Contains(s.Detail, "a.ns.svc.cluster.local") {
		t.Errorf("b: %+v", s)
	}
	if s := res.Skipped[1]; s.Host != "c.ns.svc.cluster.local" || s.Reason != SkipNoGatewayAddress || !strings.Contains(s.Detail, `"pending"`) {
		t.Errorf("c: %+v", s)
	}
	s1, err := NewSnapshot(res, nil)
	if err != nil {
		t.Fatal(err)
	}
	rev := &catalog.Catalog{}
	for i := len(cat.Services) - 1; i >= 0; i-- {
		rev.Services = append(rev.Services, cat.Services[i])
	}
	rev.Normalize()
	again, err := Translate(rev, opts)
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := NewSnapshot(again, nil)
	if s1.ConfigVersion != s2.ConfigVersion || !slices.Equal(res.Skipped, again.Skipped) {
		t.Fatalf("not deterministic: versions %s %s, skipped %+v and %+v", s1.ConfigVersion, s2.ConfigVersion, res.Skipped, again.Skipped)
	}
	// A bad listen address is no one service's fault: the whole translation fails.
	if _, err := Translate(cat, Options{ListenAddress: "any", Gateways: opts.Gateways}); err == nil {
		t.Fatal("a bad listen address was accepted")
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
	// A changed, invalid resource is caught although its name was validated before. (A change is
	// a new object: built resources are being served and are never modified.)
	bad := proto.Clone(again.Clusters[0]).(*cluster.Cluster)
	bad.ConnectTimeout.Seconds = -1
	again.Clusters[0] = bad
	if _, err := b.Build(again, nil); err == nil || !strings.Contains(err.Error(), "ConnectTimeout") {
		t.Fatalf("invalid changed cluster accepted: %v", err)
	}
}

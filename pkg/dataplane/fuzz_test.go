package dataplane

import (
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	fileal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// The xDS parsers are fuzzed from marshaled resources, seeded with what the control plane emits
// for a catalog using every feature (and the reverse direction, peer metadata, limits and access
// logs), so mutations start from configurations the data plane really receives. Each parser must
// either accept a resource or refuse it with an error that names the resource and the field; what
// it accepts must be usable without panicking.

// fuzzResources is the control plane's output for every catalog feature, with its secrets.
func fuzzResources(tb testing.TB) (*controlplane.Resources, []*tlsv3.Secret) {
	tb.Helper()
	set, err := meshtest.EchoDescriptorSet()
	if err != nil {
		tb.Fatal(err)
	}
	id := func(sa string) []string { return []string{"spiffe://cluster.local/ns/bookinfo/sa/" + sa} }
	cat := &catalog.Catalog{Services: []catalog.Service{
		{Host: "productpage.bookinfo.svc.cluster.local", Aliases: []string{"productpage.example.internal"},
			Ports: []catalog.Port{{Number: 9080, Protocol: catalog.HTTP}}, Identities: id("productpage")},
		{Host: "reviews.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 9080, Protocol: catalog.HTTP}}, Identities: id("reviews"),
			Subsets: []catalog.Subset{{Name: "v2", Hosts: []string{"reviews-v2.example.internal"}}}, AllowedClients: []string{"10.0.0.0/8", "::1/128"}},
		{Host: "ratings.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 50051, Protocol: catalog.GRPC}}, Identities: id("ratings"),
			Gateways: []string{"eastwest-a"}, Transcoding: &catalog.Transcoding{DescriptorSet: "echo.pb", Services: []string{meshtest.EchoService}, Descriptor: set}},
		{Host: "details.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 9443, Protocol: catalog.HTTP2}}, Identities: id("details")},
		{Host: "mysql.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 3306, Protocol: catalog.TCP}},
			Identities: append(id("mysql"), id("mysql-replica")...), AllowedClients: []string{"10.1.2.0/24", "10.1.3.7/32"}},
	}}
	cat.Normalize()
	if err := cat.Validate(catalog.Options{}); err != nil {
		tb.Fatal(err)
	}
	pm := fleetPeer
	res, err := controlplane.Translate(cat, controlplane.Options{
		ListenAddress: "0.0.0.0",
		Gateways: []controlplane.Gateway{
			{Name: "eastwest-a", Network: "network1", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.20.0.10:15443")}},
			{Name: "eastwest-b", Network: "network2", Priority: 1, Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.30.0.10:15443"), netip.MustParseAddrPort("[fd00::1]:15443")}},
		},
		ConnectTimeout: time.Second, AccessLog: true, PeerMetadata: &pm,
		Outlier: controlplane.Outlier{ConsecutiveErrors: 5, Interval: time.Second, BaseEjectionTime: time.Second, MaxEjectionPercent: 10},
		Limits:  controlplane.Limits{MaxRequestHeadersKB: 32, MaxHeadersCount: 50, MaxConnections: 1000},
		Reverse: &controlplane.Reverse{
			Address: "0.0.0.0", Port: 15443, TrustDomain: "cluster.local", ConnectTimeout: time.Second,
			HealthCheck: controlplane.HealthCheck{Interval: time.Second, Timeout: time.Second, UnhealthyThreshold: 2, HealthyThreshold: 1},
			Outlier:     controlplane.Outlier{ConsecutiveErrors: 3, Interval: time.Second, BaseEjectionTime: time.Second, MaxEjectionPercent: 50},
			Services: []controlplane.ReverseService{
				{Host: "billing.vm.example.internal", Aliases: []string{"billing.legacy.internal"},
					Ports:    []controlplane.ReversePort{{Number: 8080, TargetPort: 80, Protocol: catalog.HTTP, HealthCheckPath: "/healthz"}},
					Backends: []controlplane.Backend{{Host: "10.0.1.5"}, {Host: "10.0.1.6", Port: 8081}}, Principals: []string{"spiffe://cluster.local/ns/shop/sa/frontend"}},
				{Host: "ldap.vm.example.internal", Ports: []controlplane.ReversePort{{Number: 389, TargetPort: 389, Protocol: catalog.TCP}},
					Backends: []controlplane.Backend{{Host: "ldap1.vm.example.internal"}}},
			},
		},
	})
	if err != nil {
		tb.Fatal(err)
	}
	if len(res.Skipped) > 0 {
		tb.Fatalf("the seed catalog leaves services out: %+v", res.Skipped)
	}
	ca, err := meshtest.NewCA("fuzz")
	if err != nil {
		tb.Fatal(err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/legacy/sa/fwdproxy", time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	return res, controlplane.Secrets(&identity.Bundle{CertChainPEM: leaf.ChainPEM, KeyPEM: leaf.KeyPEM, RootsPEM: ca.RootPEM})
}

// addSeeds adds each resource, marshaled, to the corpus; it fails when there is none, so a
// change to the control plane cannot leave a target without its seeds unnoticed.
func addSeeds[T proto.Message](f *testing.F, ms []T) {
	f.Helper()
	if len(ms) == 0 {
		f.Fatal("the control plane emitted no resource of this type to seed the corpus with")
	}
	for _, m := range ms {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// confine points what a fuzzed resource could make a parser open at dir: file access logs (which
// the parser opens for appending) and file data sources (which it reads). Nested typed configs
// are rewritten too.
func confine(m protoreflect.Message, dir string) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool { confine(mv.Message(), dir); return true })
			}
		case fd.IsList():
			if fd.Message() != nil {
				for i := 0; i < v.List().Len(); i++ {
					confine(v.List().Get(i).Message(), dir)
				}
			}
		case fd.Message() != nil:
			confine(v.Message(), dir)
		}
		return true
	})
	switch x := m.Interface().(type) {
	case *anypb.Any:
		inner, err := x.UnmarshalNew()
		if err != nil {
			return // the parser refuses it
		}
		confine(inner.ProtoReflect(), dir)
		if b, err := (proto.MarshalOptions{Deterministic: true}).Marshal(inner); err == nil {
			x.Value = b
		}
	case *fileal.FileAccessLog:
		if x.Path != "" {
			x.Path = filepath.Join(dir, "access.log")
		}
	case *core.DataSource:
		if x.GetFilename() != "" {
			x.Specifier = &core.DataSource_Filename{Filename: filepath.Join(dir, "absent")}
		}
	}
}

// checkErr fails unless err is unnamed (a resource without a name: the error says so), or
// names the resource (prefix) and says what is wrong with which field.
func checkErr(t *testing.T, err error, unnamed, prefix string) {
	t.Helper()
	msg := err.Error()
	if unnamed != "" && msg == unnamed {
		return
	}
	if rest, ok := strings.CutPrefix(msg, prefix); !ok || strings.TrimSpace(rest) == "" {
		t.Fatalf("error does not name the resource and field (want %q, or a prefix %q and more): %q", unnamed, prefix, msg)
	}
}

// unmarshal decodes a fuzzed resource and confines it; false when the bytes are no resource.
func unmarshal(b []byte, m proto.Message, dir string) bool {
	if proto.Unmarshal(b, m) != nil {
		return false
	}
	confine(m.ProtoReflect(), dir)
	return true
}

// Addresses a fuzzed filter may be asked about.
var fuzzPeers = []netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"), netip.MustParseAddr("192.0.2.1")}

func FuzzParseListener(f *testing.F) {
	res, _ := fuzzResources(f)
	addSeeds(f, res.Listeners)
	// The inbound listener with a chain that lost its filter_chain_match: refused by name, where
	// it once panicked (cloning the nil match).
	for _, l := range res.Listeners {
		if isInbound(l) {
			l = proto.Clone(l).(*listener.Listener)
			l.FilterChains[len(l.FilterChains)-1].FilterChainMatch = nil
			addSeeds(f, []*listener.Listener{l})
		}
	}
	dir := f.TempDir()
	dp := New(Options{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var l listener.Listener
		if !unmarshal(b, &l, dir) {
			return
		}
		cfg, err := dp.parseListener(&l, "")
		if err != nil {
			checkErr(t, err, "listener without a name", "listener "+strconv.Quote(l.GetName())+": ")
			return
		}
		if _, _, err := net.SplitHostPort(cfg.addr); err != nil {
			t.Fatalf("listen address %q: %v", cfg.addr, err)
		}
		cfg.routeName()
		cfg.secretNames()
		for _, a := range fuzzPeers {
			if cfg.sources != nil {
				cfg.sources.allowed(a)
			}
			if cfg.http != nil && cfg.http.rbac != nil && cfg.http.rbac.engine != nil {
				cfg.http.rbac.engine.allowed(a)
			}
		}
		if cfg.http != nil && cfg.http.inline != nil {
			useTable(t, cfg.http.inline, l.GetFilterChains()[0].GetName())
		}
	})
}

func FuzzParseRouteConfiguration(f *testing.F) {
	res, _ := fuzzResources(f)
	addSeeds(f, res.Routes)
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		var rc route.RouteConfiguration
		if !unmarshal(b, &rc, dir) {
			return
		}
		tbl, err := parseRouteConfig(&rc)
		if err != nil {
			checkErr(t, err, "", "route configuration "+strconv.Quote(rc.GetName())+": ")
			return
		}
		// Every exact domain finds its own virtual host.
		for _, v := range rc.GetVirtualHosts() {
			for _, d := range v.GetDomains() {
				if strings.Contains(d, "*") {
					continue
				}
				if vh := tbl.lookup(d); vh == nil || vh.name != v.GetName() {
					t.Fatalf("domain %q of virtual host %q looked up as %v", d, v.GetName(), vh)
				}
			}
		}
		useTable(t, tbl, "")
	})
}

// useTable looks up and matches what a table's own routes and domains suggest.
func useTable(t *testing.T, tbl *routeTable, extra string) {
	t.Helper()
	for _, v := range tbl.proto.GetVirtualHosts() {
		for _, d := range append(v.GetDomains(), extra) {
			vh := tbl.lookup(d)
			if vh == nil {
				continue
			}
			for _, r := range v.GetRoutes() {
				p := r.GetMatch().GetPrefix() + r.GetMatch().GetPath()
				vh.match(p)
				vh.match(p + "?q")
			}
		}
	}
}

func FuzzParseCluster(f *testing.F) {
	res, _ := fuzzResources(f)
	addSeeds(f, res.Clusters)
	dir := f.TempDir()
	dp := New(Options{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var c clusterpb.Cluster
		if !unmarshal(b, &c, dir) {
			return
		}
		cfg, err := dp.parseCluster(&c)
		if err != nil {
			checkErr(t, err, "cluster without a name", "cluster "+strconv.Quote(c.GetName())+": ")
			return
		}
		if cfg.edsName == "" && cfg.static == nil && cfg.dns == nil && c.GetType() == clusterpb.Cluster_EDS {
			t.Fatal("an EDS cluster without the name of its endpoints")
		}
		if s := cfg.tls; s != nil && s.rootsSecret == "" {
			t.Fatal("a TLS cluster with no trust bundle: it would connect without verifying the server")
		}
		if od := cfg.outlier; od == nil || (od.interval <= 0 || od.maxEje < od.baseEjection || od.maxEjectionPercent > 100) {
			t.Fatalf("outlier detection out of range: %+v", od)
		}
		checkEndpoints(t, cfg.static)
	})
}

func FuzzParseClusterLoadAssignment(f *testing.F) {
	res, _ := fuzzResources(f)
	addSeeds(f, res.Endpoints)
	// Priorities, health states and a named port the control plane never sends.
	addSeeds(f, []*endpoint.ClusterLoadAssignment{{ClusterName: "c", Endpoints: []*endpoint.LocalityLbEndpoints{
		{Priority: 1, LbEndpoints: []*endpoint.LbEndpoint{
			{HealthStatus: core.HealthStatus_UNHEALTHY, HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Hostname: "h",
				Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{Address: "::1", PortSpecifier: &core.SocketAddress_PortValue{PortValue: 443}}}}}}},
			{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
				Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{Address: "10.0.0.1", PortSpecifier: &core.SocketAddress_NamedPort{NamedPort: "http"}}}}}}},
		}, LoadBalancingWeight: wrapperspb.UInt32(1)},
	}}})
	f.Fuzz(func(t *testing.T, b []byte) {
		var cla endpoint.ClusterLoadAssignment
		if proto.Unmarshal(b, &cla) != nil {
			return
		}
		eps, err := parseCLA(&cla)
		if err != nil {
			checkErr(t, err, "", "endpoints[")
			return
		}
		checkEndpoints(t, eps)
	})
}

// checkEndpoints: every endpoint accepted is an address a connection can be made to, at a
// priority the data plane keeps.
func checkEndpoints(t *testing.T, eps []endpointSpec) {
	t.Helper()
	for _, e := range eps {
		ap, err := netip.ParseAddrPort(e.addr)
		if err != nil || ap.Port() == 0 {
			t.Fatalf("endpoint address %q: %v", e.addr, err)
		}
		if e.priority > maxPriority {
			t.Fatalf("endpoint priority %d over %d", e.priority, maxPriority)
		}
	}
}

func FuzzParseSecret(f *testing.F) {
	_, secrets := fuzzResources(f)
	addSeeds(f, secrets)
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		var s tlsv3.Secret
		if !unmarshal(b, &s, dir) {
			return
		}
		sec, err := parseSecret(&s)
		if err != nil {
			checkErr(t, err, "secret without a name", "secret "+strconv.Quote(s.GetName())+": ")
			if key := s.GetTlsCertificate().GetPrivateKey().GetInlineBytes(); len(key) > 8 && strings.Contains(err.Error(), string(key)) {
				t.Fatal("the error quotes the private key")
			}
			return
		}
		if (sec.cert == nil) == (sec.roots == nil) {
			t.Fatalf("a secret is either a certificate or a trust bundle: %+v", sec)
		}
		if sec.cert != nil && (len(sec.cert.Certificate) == 0 || sec.cert.PrivateKey == nil) {
			t.Fatal("a certificate secret without a chain or key")
		}
	})
}

// FuzzRouteLookup checks the route table's lookup (virtual host by Host) and match (route by
// path) against a plain model of Envoy's rules: an exact domain, then the longest "*suffix",
// then the longest "prefix*", then "*"; within a virtual host the first route whose prefix
// matches, case-sensitively, the query string ignored. Envoy folds case in ASCII only.
// caseSensitive picks case_sensitive: true or unset, the two forms of what the data plane accepts
// (case-insensitive and exact-path matches are refused; nothing emits them).
func FuzzRouteLookup(f *testing.F) {
	f.Add("reviews.bookinfo.svc.cluster.local,reviews.bookinfo.svc.cluster.local:9080,*.example.internal,api.*,*", "/,/api", true, "Reviews.example.internal", "/api/v1?x=1")
	f.Add("*.b.c,*.c,a.*,a.b.*", "/a", false, "x.b.c", "/A")
	f.Add("a.b", "/exact", true, "A.B", "/exact?q")
	f.Add("*", "", true, "", "")
	f.Fuzz(func(t *testing.T, domains, prefixes string, caseSensitive bool, host, path string) {
		// Each domain gets its own virtual host, with a prefix route per prefix given.
		var cs *wrapperspb.BoolValue
		if caseSensitive {
			cs = wrapperspb.Bool(true)
		}
		rc := &route.RouteConfiguration{Name: "fuzz"}
		for i, d := range strings.Split(domains, ",") {
			v := &route.VirtualHost{Name: "vh" + strconv.Itoa(i), Domains: []string{d}}
			for j, p := range strings.Split(prefixes, ",") {
				action := &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: "c" + strconv.Itoa(j)}}}
				v.Routes = append(v.Routes, &route.Route{Name: "prefix" + strconv.Itoa(j), Action: action, Match: &route.RouteMatch{
					PathSpecifier: &route.RouteMatch_Prefix{Prefix: p}, CaseSensitive: cs}})
			}
			rc.VirtualHosts = append(rc.VirtualHosts, v)
		}
		tbl, err := parseRouteConfig(rc)
		if err != nil {
			checkErr(t, err, "", "route configuration \"fuzz\": ")
			return
		}
		want := modelLookup(rc, host)
		got := tbl.lookup(host)
		switch {
		case want == nil && got == nil:
			return
		case want == nil || got == nil || got.name != want.GetName():
			t.Fatalf("lookup(%q) = %v, Envoy's rules pick %v", host, name(got), want.GetName())
		}
		wantRoute := modelMatch(want, path)
		gotRoute := got.match(path)
		if (wantRoute == nil) != (gotRoute == nil) || wantRoute != nil && gotRoute.name != wantRoute.GetName() {
			t.Fatalf("match(%q) in %s = %v, Envoy's rules pick %v", path, want.GetName(), gotRoute, wantRoute.GetName())
		}
	})
}

func modelLookup(rc *route.RouteConfiguration, host string) *route.VirtualHost {
	h := modelLower(host)
	var bestSuffix, bestPrefix, any *route.VirtualHost
	suffixLen, prefixLen := -1, -1
	for _, v := range rc.GetVirtualHosts() {
		for _, d := range v.GetDomains() {
			d = modelLower(d)
			switch {
			case d == "*":
				any = v
			case strings.HasPrefix(d, "*"):
				if s := d[1:]; len(h) > len(s) && strings.HasSuffix(h, s) && len(s) > suffixLen {
					bestSuffix, suffixLen = v, len(s)
				}
			case strings.HasSuffix(d, "*"):
				if p := d[:len(d)-1]; len(h) > len(p) && strings.HasPrefix(h, p) && len(p) > prefixLen {
					bestPrefix, prefixLen = v, len(p)
				}
			case d == h:
				return v
			}
		}
	}
	switch {
	case bestSuffix != nil:
		return bestSuffix
	case bestPrefix != nil:
		return bestPrefix
	}
	return any
}

func modelMatch(v *route.VirtualHost, path string) *route.Route {
	path, _, _ = strings.Cut(path, "?")
	for _, r := range v.GetRoutes() {
		if p := r.GetMatch().GetPrefix(); len(path) >= len(p) && path[:len(p)] == p {
			return r
		}
	}
	return nil
}

// modelLower is the model's own ASCII lower-casing, apart from the code under test.
func modelLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func name(vh *virtualHost) string {
	if vh == nil {
		return "none"
	}
	return vh.name
}

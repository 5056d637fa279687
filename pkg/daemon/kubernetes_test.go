package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
)

func kubeConfig(t *testing.T) *config.Config {
	t.Helper()
	dir := t.TempDir()
	doc := `gateways: []
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
discovery:
  kubernetes:
    - name: primary
      kubeconfig: missing.kubeconfig
      namespaces: [bookinfo]
`
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatalf("a config whose only gateway is discovered should be valid: %v", err)
	}
	return cfg
}

func gatewayAddrs(d *Daemon, name string) []netip.AddrPort {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, g := range d.gateways {
		if g.Name == name {
			return g.Addresses
		}
	}
	return nil
}

// A gateway discovered in Kubernetes is resolved like a configured one, at once when it changes,
// and services naming it are left out of the configuration until it has an address.
func TestDiscoveredGateway(t *testing.T) {
	cfg := kubeConfig(t)
	d := New(cfg, slog.New(slog.DiscardHandler))
	if d.kube == nil || len(d.sources) != 1 || d.sources[0].Name() != "kubernetes:primary" {
		t.Fatalf("sources: %v", d.sources)
	}
	svc := catalog.Service{Host: "reviews.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 9080, Protocol: catalog.HTTP}},
		Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"}, Gateways: []string{"primary"}}
	d.SetCatalog("kubernetes:primary", &catalog.Catalog{Services: []catalog.Service{svc}})
	cat, opts, _, conflicts := d.Inputs()
	if len(cat.Services) != 1 || len(conflicts) != 0 {
		t.Fatalf("before the gateway has an address: services %v, conflicts %v", cat.Services, conflicts)
	}
	// Translation leaves it out, reported; a gateway elsewhere would still serve the rest.
	opts.Gateways = []controlplane.Gateway{{Name: "elsewhere", Addresses: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.9:15443")}}}
	res, err := controlplane.Translate(cat, opts)
	if err != nil || len(res.Clusters) != 0 || len(res.Skipped) != 1 || res.Skipped[0].Reason != controlplane.SkipNoGatewayAddress {
		t.Fatalf("before the gateway has an address: %v, clusters %d, skipped %+v", err, len(res.Clusters), res.Skipped)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.resolveGateways(ctx) }()
	defer func() { cancel(); <-done }()

	d.kube.Set(discovery.DiscoveredGateway{Name: "primary", Port: 15443, Addresses: []string{"127.0.0.2", "127.0.0.1"}})
	want := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15443"), netip.MustParseAddrPort("127.0.0.2:15443")}
	eventually(t, "the discovered gateway resolved", func() bool { return slices.Equal(gatewayAddrs(d, "primary"), want) })
	cat, opts, _, conflicts = d.Inputs()
	if len(cat.Services) != 1 || len(conflicts) != 0 {
		t.Fatalf("with the gateway resolved: services %v, conflicts %v", cat.Services, conflicts)
	}
	res, err = controlplane.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if eps := res.Endpoints[0].Endpoints[0].LbEndpoints; len(eps) != 2 || eps[0].GetEndpoint().Hostname != "primary" {
		t.Errorf("endpoints: %v", eps)
	}

	// The load balancer moves: picked up without waiting for the periodic re-resolution.
	d.kube.Set(discovery.DiscoveredGateway{Name: "primary", Port: 15443, Addresses: []string{"127.0.0.3"}})
	eventually(t, "the moved gateway", func() bool {
		return slices.Equal(gatewayAddrs(d, "primary"), []netip.AddrPort{netip.MustParseAddrPort("127.0.0.3:15443")})
	})
}

func TestKubernetesSourceBadKubeconfig(t *testing.T) {
	d := New(kubeConfig(t), slog.New(slog.DiscardHandler))
	err := d.sources[0].Run(context.Background(), func(*catalog.Catalog) {})
	if err == nil || !strings.Contains(err.Error(), "discovery.kubernetes[0] (primary): kubeconfig") || !strings.Contains(err.Error(), "missing.kubeconfig") {
		t.Fatalf("a missing kubeconfig: %v", err)
	}
}

// The whole way through: Services in a (fake) API server become clusters in the served snapshot,
// reached through the discovered east-west gateway, with the discovery metrics on /metrics.
func TestKubernetesThroughDaemon(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	writeFleetIdentity(t, ca, dir, time.Hour)
	metricsAddr := freeAddr(t)
	doc := fmt.Sprintf(`identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery:
  kubernetes:
    - {name: primary, namespaces: [bookinfo], gateway: {namespace: istio-system}}
listen: {address: 127.0.0.1}
dataplane: none
xds: {socket: xds.sock}
admin: {socket: admin.sock}
metrics: {address: %q}
`, metricsAddr)
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	// The Bookinfo-like cluster of the discovery tests, its gateway's load balancer on loopback.
	data, err := os.ReadFile("../discovery/testdata/kubernetes/bookinfo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var objs []runtime.Object
	for _, part := range strings.Split(string(data), "\n---\n") {
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(part), nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if svc, ok := obj.(*corev1.Service); ok && svc.Labels["istio"] == "eastwestgateway" {
			svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "127.0.0.1"}}
		}
		objs = append(objs, obj)
	}
	d := New(cfg, slog.New(slog.DiscardHandler))
	d.sources[0].(*kubeSource).Client = fake.NewClientset(objs...)
	defer runDaemon(t, d)()
	eventually(t, "the Kubernetes services served", func() bool {
		cur := d.XDS.Current()
		if cur == nil {
			return false
		}
		_, opts, _, _ := d.Inputs()
		return len(opts.Gateways) == 1 && testutil.ToFloat64(d.metrics.catalogServices) == 6
	})
	// fwdproxy status shows the cluster's connection.
	eventually(t, "the cluster connected in the status", func() bool {
		st := d.FleetStatus(nil)
		return len(st.Kubernetes) == 1 && st.Kubernetes[0].Source == "kubernetes:primary" && st.Kubernetes[0].Running &&
			st.Kubernetes[0].Connected && !st.Kubernetes[0].Since.IsZero()
	})
	cat, opts, _, _ := d.Inputs()
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	var clusters []string
	for _, c := range res.Clusters {
		clusters = append(clusters, c.Name)
	}
	if !slices.Contains(clusters, "outbound|9080||reviews.bookinfo.svc.cluster.local") || !slices.Contains(clusters, "outbound|27017||mongodb.bookinfo.svc.cluster.local") {
		t.Errorf("clusters: %v", clusters)
	}
	if g := opts.Gateways[0]; g.Name != "primary" || len(g.Addresses) != 1 || g.Addresses[0] != netip.MustParseAddrPort("127.0.0.1:15443") {
		t.Errorf("gateway: %+v", g)
	}
	fams := scrape(t, metricsAddr)
	src := map[string]string{"source": "kubernetes:primary"}
	if v, ok := value(fams, "fwdproxy_discovery_last_success_timestamp_seconds", src); !ok || v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last success %v (present %v)", v, ok)
	}
	if v, ok := value(fams, "fwdproxy_discovery_sync_errors_total", src); !ok || v != 0 {
		t.Errorf("sync errors %v (present %v)", v, ok)
	}
	if v, _ := value(fams, "fwdproxy_discovery_services_skipped", map[string]string{"source": "kubernetes:primary", "reason": "no_workload_identity"}); v != 2 {
		t.Errorf("skipped for no identity: %v", v)
	}
}

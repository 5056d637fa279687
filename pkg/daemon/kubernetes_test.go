package daemon

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

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
// and services naming it are kept out of the catalog until it has an address.
func TestDiscoveredGateway(t *testing.T) {
	cfg := kubeConfig(t)
	d := New(cfg, slog.New(slog.DiscardHandler))
	if d.kube == nil || len(d.sources) != 1 || d.sources[0].Name() != "kubernetes:primary" {
		t.Fatalf("sources: %v", d.sources)
	}
	svc := catalog.Service{Host: "reviews.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 9080, Protocol: catalog.HTTP}},
		Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"}, Gateways: []string{"primary"}}
	d.SetCatalog("kubernetes:primary", &catalog.Catalog{Services: []catalog.Service{svc}})
	cat, _, _, conflicts := d.Inputs()
	if len(cat.Services) != 0 || len(conflicts) != 1 || !strings.Contains(conflicts[0].Error(), "unknown gateway") {
		t.Fatalf("before the gateway has an address: services %v, conflicts %v", cat.Services, conflicts)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.resolveGateways(ctx) }()
	defer func() { cancel(); <-done }()

	d.kube.set(discovery.DiscoveredGateway{Name: "primary", Port: 15443, Addresses: []string{"127.0.0.2", "127.0.0.1"}})
	want := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15443"), netip.MustParseAddrPort("127.0.0.2:15443")}
	eventually(t, "the discovered gateway resolved", func() bool { return slices.Equal(gatewayAddrs(d, "primary"), want) })
	cat, opts, _, conflicts := d.Inputs()
	if len(cat.Services) != 1 || len(conflicts) != 0 {
		t.Fatalf("with the gateway resolved: services %v, conflicts %v", cat.Services, conflicts)
	}
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if eps := res.Endpoints[0].Endpoints[0].LbEndpoints; len(eps) != 2 || eps[0].GetEndpoint().Hostname != "primary" {
		t.Errorf("endpoints: %v", eps)
	}

	// The load balancer moves: picked up without waiting for the periodic re-resolution.
	d.kube.set(discovery.DiscoveredGateway{Name: "primary", Port: 15443, Addresses: []string{"127.0.0.3"}})
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

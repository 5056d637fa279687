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

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	dto "github.com/prometheus/client_model/go"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// TestOneServiceDoesNotBlockTheRest is the operator's report: a service naming a configured
// gateway whose address has not resolved used to fail translation for the whole snapshot, so
// no other service's change was served. Now it is left out, logged, counted and shown in status,
// and everything else keeps updating; once the gateway resolves it is served too.
func TestOneServiceDoesNotBlockTheRest(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf := writeFleetIdentity(t, ca, dir, time.Hour)
	doc := `node: {id: skip-test}
gateways:
  - {name: gw-a, address: 127.0.0.1}
  - {name: gw-b, address: gw-b.mesh.example.internal}
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1}
`
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	var logs meshtest.SyncBuffer
	d := New(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	bundle, err := identity.New(fleetID, leaf.ChainPEM, leaf.KeyPEM, ca.RootPEM, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	d.SetIdentity(bundle)
	gwA := controlplane.Gateway{Name: "gw-a", Addresses: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15443")}}
	gwB := controlplane.Gateway{Name: "gw-b", Addresses: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.2:15443")}}
	setGateways := func(gws ...controlplane.Gateway) {
		d.mu.Lock()
		d.gateways = gws
		d.mu.Unlock()
	}
	svc := func(host string, port uint32, gateways ...string) catalog.Service {
		return catalog.Service{Host: host, Ports: []catalog.Port{{Number: port, Protocol: catalog.HTTP}},
			Identities: []string{"spiffe://cluster.local/ns/ns/sa/x"}, Gateways: gateways}
	}
	source := d.sources[0].Name()
	setCatalog := func(services ...catalog.Service) {
		c := &catalog.Catalog{Services: services}
		c.Normalize()
		d.SetCatalog(source, c)
	}
	served := func() []string {
		var hosts []string
		for _, typ := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
			for name := range d.XDS.Current().Cache.GetResources(typ) {
				if h, ok := strings.CutPrefix(name, "outbound|"); ok {
					hosts = append(hosts, h[strings.LastIndexByte(h, '|')+1:])
				}
			}
		}
		slices.Sort(hosts)
		return slices.Compact(hosts)
	}
	skippedGauge := func(reason string) float64 {
		fams, err := d.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		byName := map[string]*dto.MetricFamily{}
		for _, f := range fams {
			byName[f.GetName()] = f
		}
		v, ok := value(byName, "fwdproxy_translation_services_skipped", map[string]string{"reason": reason})
		if !ok {
			t.Fatalf("fwdproxy_translation_services_skipped{reason=%q} is not exported", reason)
		}
		return v
	}
	ctx := context.Background()

	// gw-b has not resolved (the daemon keeps an unresolved gateway out of the options).
	setGateways(gwA)
	setCatalog(svc("a.ns.svc.cluster.local", 8080), svc("b.ns.svc.cluster.local", 8081, "gw-b"))
	if err := d.rebuild(ctx); err != nil {
		t.Fatalf("one service without a gateway address failed the whole configuration: %v", err)
	}
	if got := served(); !slices.Equal(got, []string{"a.ns.svc.cluster.local"}) {
		t.Fatalf("served %v, want a only", got)
	}
	if v := skippedGauge(controlplane.SkipNoGatewayAddress); v != 1 {
		t.Errorf("skipped{no_gateway_address} = %v, want 1", v)
	}
	if v := skippedGauge(controlplane.SkipConflict); v != 0 {
		t.Errorf("skipped{conflict} = %v, want 0", v)
	}
	wantLog := `level=WARN msg="service left out of the configuration; every other service is served" host=b.ns.svc.cluster.local reason=no_gateway_address`
	if !strings.Contains(logs.String(), wantLog) {
		t.Errorf("no log line %q:\n%s", wantLog, logs.String())
	}
	st := d.FleetStatus(nil)
	if len(st.Skipped) != 1 || st.Skipped[0].Host != "b.ns.svc.cluster.local" || st.Skipped[0].Reason != "no_gateway_address" || !strings.Contains(st.Skipped[0].Detail, `"gw-b"`) {
		t.Errorf("status skipped: %+v", st.Skipped)
	}
	// Every service's state: a served, b skipped with its reason.
	if len(st.Services) != 2 || st.Services[0].Host != "a.ns.svc.cluster.local" || st.Services[0].State != admin.StateServed || !slices.Equal(st.Services[0].Ports, []uint32{8080}) ||
		st.Services[1].Host != "b.ns.svc.cluster.local" || st.Services[1].State != admin.StateSkipped || st.Services[1].Reason != "no_gateway_address" || st.Services[1].Detail != st.Skipped[0].Detail {
		t.Errorf("status services: %+v", st.Services)
	}

	// Every other service keeps updating; b is not logged again while nothing about it changes.
	setCatalog(svc("a.ns.svc.cluster.local", 8080), svc("b.ns.svc.cluster.local", 8081, "gw-b"), svc("c.ns.svc.cluster.local", 8082))
	if err := d.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	if got := served(); !slices.Equal(got, []string{"a.ns.svc.cluster.local", "c.ns.svc.cluster.local"}) {
		t.Fatalf("after adding c: served %v", got)
	}
	if n := strings.Count(logs.String(), "host=b.ns.svc.cluster.local reason=no_gateway_address"); n != 1 {
		t.Errorf("b logged %d times, want once", n)
	}

	// gw-b resolves: b is served, nothing is left out.
	setGateways(gwA, gwB)
	if err := d.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	if got := served(); len(got) != 3 {
		t.Fatalf("after gw-b resolved: served %v", got)
	}
	if v := skippedGauge(controlplane.SkipNoGatewayAddress); v != 0 {
		t.Errorf("skipped{no_gateway_address} = %v after the gateway resolved", v)
	}
	if st := d.FleetStatus(nil); len(st.Skipped) != 0 || len(st.Services) != 3 || st.Services[1].State != admin.StateServed {
		t.Errorf("status still lists %+v, services %+v", st.Skipped, st.Services)
	}
	if want := fmt.Sprintf("msg=%q host=b.ns.svc.cluster.local", "service no longer left out of the configuration"); !strings.Contains(logs.String(), want) {
		t.Errorf("no log line %q:\n%s", want, logs.String())
	}
}

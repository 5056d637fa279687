package meshconfig

import (
	"bytes"
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func render(t *testing.T, withReverse bool) []byte {
	t.Helper()
	cfg, err := config.Load("testdata/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cat, err := catalog.Load("testdata/catalog.yaml", cfg.CatalogOptions())
	if err != nil {
		t.Fatal(err)
	}
	o := Options{FleetSPIFFEID: cfg.Identity.SPIFFEID, Catalog: cat, Namespaces: []string{"bookinfo", "inventory"}}
	if withReverse {
		if o.Reverse, err = LoadReverse("testdata/reverse.yaml"); err != nil {
			t.Fatal(err)
		}
	}
	out, err := Render(o)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestGolden(t *testing.T) {
	got := render(t, true)
	const golden = "testdata/mesh-config.golden.yaml"
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./pkg/meshconfig -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("output differs from %s (rerun with -update after reviewing):\n%s", golden, got)
	}
	if again := render(t, true); !bytes.Equal(again, got) {
		t.Error("rendering is not deterministic")
	}
}

func TestNamespaces(t *testing.T) {
	for _, tc := range []struct {
		svc  catalog.Service
		want string
	}{
		{catalog.Service{Host: "a.x.svc.cluster.local", Identities: []string{"spiffe://cluster.local/ns/y/sa/a", "spiffe://cluster.local/ns/z/sa/a"}}, "y,z"},
		{catalog.Service{Host: "a.x.svc.cluster.local", Identities: []string{"spiffe://example.org/workload/a"}}, "x"},
		{catalog.Service{Host: "a.example.org", Identities: []string{"spiffe://example.org/workload/a"}}, ""},
	} {
		if got := strings.Join(serviceNamespaces(tc.svc), ","); got != tc.want {
			t.Errorf("%s %v: namespaces %q, want %q", tc.svc.Host, tc.svc.Identities, got, tc.want)
		}
	}
	out, err := Render(Options{FleetSPIFFEID: "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", Catalog: &catalog.Catalog{Services: []catalog.Service{
		{Host: "a.example.org", Ports: []catalog.Port{{Number: 80, Protocol: catalog.HTTP}}, Identities: []string{"spiffe://example.org/workload/a"}}}}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "# No namespace known for a.example.org") {
		t.Errorf("a service with no known namespace is not called out:\n%s", out)
	}
}

func TestReverseProblems(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/reverse.yaml"
	bad := `loadBalancer: "not a name"
namespace: Bad_NS
services:
  - host: billing
    ports: [{number: 70000, protocol: http}]
`
	if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadReverse(path)
	if err == nil {
		t.Fatal("a bad reverse file was accepted")
	}
	for _, want := range []string{"reverse.yaml:1: loadBalancer", "reverse.yaml:2: namespace", "services[0].host", "services[0].ports[0].number"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if err := os.WriteFile(path, []byte("loadBalancer: 10.0.0.5\nservices:\n  - host: a.vm.internal\n    ports: [{number: 80, protocol: http}]\n    extra: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadReverse(path); err == nil || !strings.Contains(err.Error(), "extra") {
		t.Errorf("an unknown field was accepted: %v", err)
	}
	r := &Reverse{LoadBalancer: "10.0.0.5", Services: []ReverseService{{Host: "a.vm.internal", Ports: []catalog.Port{{Number: 80, Protocol: catalog.HTTP}}}}}
	out, err := Render(Options{FleetSPIFFEID: "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", Reverse: r})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "resolution: STATIC") || !strings.Contains(string(out), "- address: 10.0.0.5") {
		t.Errorf("an IP load balancer should give a STATIC entry:\n%s", out)
	}
}

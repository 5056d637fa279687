package meshconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"os"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	networking "istio.io/api/networking/v1"
	security "istio.io/api/security/v1"

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

// decodeDocs splits a YAML stream into documents.
func decodeDocs(t *testing.T, data []byte) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var docs []map[string]any
	for {
		var d map[string]any
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("output is not YAML: %v", err)
		}
		if d != nil {
			docs = append(docs, d)
		}
	}
	return docs
}

// TestIstioAcceptsTheResources decodes each spec into Istio's own API types, rejecting unknown
// fields and bad enum values, then checks the values the fleet depends on.
func TestIstioAcceptsTheResources(t *testing.T) {
	docs := decodeDocs(t, render(t, true))
	kinds := map[string]int{}
	ruleHosts := map[string]int{} // ServiceEntry host -> DestinationRules for it
	strict := protojson.UnmarshalOptions{DiscardUnknown: false}
	for _, d := range docs {
		kind, _ := d["kind"].(string)
		kinds[kind]++
		meta, _ := d["metadata"].(map[string]any)
		if meta["name"] == "" || meta["namespace"] == "" {
			t.Errorf("%s without name or namespace: %v", kind, meta)
		}
		spec, err := json.Marshal(d["spec"])
		if err != nil {
			t.Fatal(err)
		}
		var msg proto.Message
		switch kind {
		case "Gateway":
			msg = &networking.Gateway{}
		case "ServiceEntry":
			msg = &networking.ServiceEntry{}
		case "AuthorizationPolicy":
			msg = &security.AuthorizationPolicy{}
		case "DestinationRule":
			msg = &networking.DestinationRule{}
		default:
			t.Fatalf("unexpected kind %q", kind)
		}
		if err := strict.Unmarshal(spec, msg); err != nil {
			t.Fatalf("%s %v: Istio's API rejects the spec: %v\n%s", kind, meta["name"], err, spec)
		}
		wantAPI := map[string]string{"Gateway": "networking.istio.io/v1", "ServiceEntry": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1", "AuthorizationPolicy": "security.istio.io/v1"}[kind]
		if d["apiVersion"] != wantAPI {
			t.Errorf("%s apiVersion %v, want %s", kind, d["apiVersion"], wantAPI)
		}
		switch m := msg.(type) {
		case *networking.Gateway:
			s := m.Servers[0]
			if m.Selector["istio"] != "eastwestgateway" || s.Port.Number != 15443 || s.Port.Name != "tls" || s.Port.Protocol != "TLS" ||
				s.Tls.Mode != networking.ServerTLSSettings_AUTO_PASSTHROUGH || s.Hosts[0] != "*.local" {
				t.Errorf("gateway: %v", m)
			}
			if strings.Join(s.Hosts, ",") != "*.local,orders.shop.example.internal" {
				t.Errorf("gateway hosts %v", s.Hosts)
			}
			if meta["name"] != "cross-network-gateway" || meta["namespace"] != "istio-system" {
				t.Errorf("gateway metadata %v", meta)
			}
		case *networking.DestinationRule:
			if m.TrafficPolicy.GetTls().GetMode() != networking.ClientTLSSettings_ISTIO_MUTUAL || m.TrafficPolicy.GetTls().GetSni() != "" {
				t.Errorf("destination rule %s: %v", m.Host, m.TrafficPolicy)
			}
			ruleHosts[m.Host]++
		case *security.AuthorizationPolicy:
			p := m.Rules[0].From[0].Source.Principals
			if m.Action != security.AuthorizationPolicy_ALLOW || len(p) != 1 || p[0] != "cluster.local/ns/fwdproxy/sa/fwdproxy" {
				t.Errorf("policy in %v: %v", meta["namespace"], m)
			}
		case *networking.ServiceEntry:
			// The fleet's load balancer is the one endpoint, on the inbound port for every
			// service port, and the sidecar checks the fleet's identity (ISTIO_MUTUAL verifies
			// the server against the ServiceEntry's subjectAltNames).
			if m.Location != networking.ServiceEntry_MESH_INTERNAL || m.Resolution != networking.ServiceEntry_DNS ||
				len(m.Endpoints) != 1 || m.Endpoints[0].Address != "internal-fwdproxy-0123456789.elb.eu-west-1.amazonaws.com" ||
				len(m.SubjectAltNames) != 1 || m.SubjectAltNames[0] != "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy" {
				t.Errorf("service entry: %v", m)
			}
			if len(m.Ports) == 0 {
				t.Errorf("service entry %v has no ports", m.Hosts)
			}
			for _, p := range m.Ports {
				if m.Endpoints[0].Ports[p.Name] != 15443 {
					t.Errorf("service entry %v: port %s reaches endpoint port %d, want 15443", m.Hosts, p.Name, m.Endpoints[0].Ports[p.Name])
				}
			}
			for _, h := range m.Hosts {
				ruleHosts[h] += 0
			}
			if m.Hosts[0] == "billing.vm.example.internal" &&
				(len(m.Ports) != 2 || m.Ports[0].Number != 5432 || m.Ports[0].Protocol != "TCP" || m.Ports[0].Name != "postgres" ||
					m.Ports[1].Number != 8080 || m.Ports[1].Protocol != "HTTP" || m.Ports[1].Name != "http-8080") {
				t.Errorf("billing ports: %v", m.Ports)
			}
		}
	}
	// bookinfo, orders, payments from the catalog; inventory from discovery namespaces.
	if kinds["Gateway"] != 1 || kinds["AuthorizationPolicy"] != 4 || kinds["ServiceEntry"] != 2 || kinds["DestinationRule"] != 3 {
		t.Errorf("resources: %v", kinds)
	}
	for h, n := range ruleHosts { // one ISTIO_MUTUAL rule per ServiceEntry host, aliases too
		if n != 1 {
			t.Errorf("host %s has %d DestinationRules, want 1", h, n)
		}
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

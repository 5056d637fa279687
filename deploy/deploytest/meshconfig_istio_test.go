package deploytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	networking "istio.io/api/networking/v1"
	security "istio.io/api/security/v1"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/meshconfig"
)

// This test lives here rather than in pkg/meshconfig so that Istio's API module stays out of the
// product's go.mod: it renders pkg/meshconfig's test inputs and decodes the result with Istio's
// own types.

var meshconfigTestdata = filepath.Join(repoRoot, "pkg", "meshconfig", "testdata")

// renderMeshConfig renders pkg/meshconfig's test config, catalog and reverse services, as its
// golden test does.
func renderMeshConfig(t *testing.T) []byte {
	t.Helper()
	cfg, err := config.Load(filepath.Join(meshconfigTestdata, "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cat, err := catalog.Load(filepath.Join(meshconfigTestdata, "catalog.yaml"), cfg.CatalogOptions())
	if err != nil {
		t.Fatal(err)
	}
	o := meshconfig.Options{FleetSPIFFEID: cfg.Identity.SPIFFEID, Catalog: cat, Namespaces: []string{"bookinfo", "inventory"}}
	if o.Reverse, err = meshconfig.LoadReverse(filepath.Join(meshconfigTestdata, "reverse.yaml")); err != nil {
		t.Fatal(err)
	}
	out, err := meshconfig.Render(o)
	if err != nil {
		t.Fatal(err)
	}
	return out
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
	docs := decodeDocs(t, renderMeshConfig(t))
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

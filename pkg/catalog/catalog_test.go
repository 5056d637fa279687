package catalog

import (
	"os"
	"strings"
	"testing"
)

func TestParseExample(t *testing.T) {
	data, err := os.ReadFile("../../examples/catalog.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Parse("catalog.yaml", data, Options{Gateways: []string{"eastwest-a", "eastwest-b"}})
	if err != nil {
		t.Fatalf("example catalog rejected: %v", err)
	}
	if len(c.Services) != 4 {
		t.Fatalf("want 4 services, got %d", len(c.Services))
	}
	// Normalized: sorted by host.
	for i := 1; i < len(c.Services); i++ {
		if c.Services[i-1].Host >= c.Services[i].Host {
			t.Fatalf("services not sorted: %s before %s", c.Services[i-1].Host, c.Services[i].Host)
		}
	}
	r := c.Lookup("Reviews.Bookinfo.svc.cluster.local.")
	if r == nil || r.Subsets[0].Name != "v2" || r.AllowedClients[0] != "10.0.0.0/8" {
		t.Fatalf("reviews not parsed as expected: %+v", r)
	}
}

func TestParseErrorsNameFileLineAndField(t *testing.T) {
	cases := []struct {
		name, doc string
		want      []string
	}{
		{"unknown field", `
services:
  - host: a.ns.svc.cluster.local
    portz: []
`, []string{"c.yaml:4: services[0].portz: unknown field \"portz\"; did you mean \"ports\"?"}},
		{"bad port", `
services:
  - host: a.ns.svc.cluster.local
    ports:
      - number: 70000
        protocol: http
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`, []string{"c.yaml:5: services[0].ports[0].number: 70000 is not a valid port; use 1-65535"}},
		{"bad protocol", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: udp}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`, []string{`services[0].ports[0].protocol: "udp" is not supported; use one of http, http2, grpc, tcp`}},
		{"duplicate host", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
  - host: A.ns.svc.cluster.local.
    ports: [{number: 81, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`, []string{`c.yaml:6: services[1].host: host "a.ns.svc.cluster.local" is already used by services[0].host`}},
		{"alias collides with host", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
  - host: b.ns.svc.cluster.local
    aliases: [a.ns.svc.cluster.local]
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`, []string{`services[1].aliases[0]: host "a.ns.svc.cluster.local" is already used by services[0].host`}},
		{"tcp port collision", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 3306, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
  - host: b.ns.svc.cluster.local
    ports: [{number: 3306, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`, []string{`c.yaml:7: services[1].ports[0].number: port 3306 (tcp) collides with a.ns.svc.cluster.local`}},
		{"tcp vs http collision", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 8080, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
  - host: b.ns.svc.cluster.local
    ports: [{number: 8080, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`, []string{`port 8080 (tcp) collides with a.ns.svc.cluster.local (http`}},
		{"malformed spiffe", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [cluster.local/ns/ns/sa/a, "spiffe://cluster.local"]
`, []string{`services[0].identities[0]: "cluster.local/ns/ns/sa/a" is not a valid SPIFFE ID`, `services[0].identities[1]: "spiffe://cluster.local" names only a trust domain`}},
		{"bad cidr", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
    allowedClients: [10.0.0.1, 10.0.0.0/33]
`, []string{`allowedClients[0]: "10.0.0.1" is not a CIDR such as 10.0.0.0/8; for one address write 10.0.0.1/32`, `allowedClients[1]: "10.0.0.0/33"`}},
		{"cidr with host bits", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
    allowedClients: [10.0.0.0/8, 10.0.0.5/8, "fd00::1/64"]
`, []string{`c.yaml:6: services[0].allowedClients[1]: "10.0.0.5/8" has host bits set; did you mean 10.0.0.0/8? (for the one address write 10.0.0.5/32)`, `services[0].allowedClients[2]: "fd00::1/64" has host bits set; did you mean fd00::/64?`}},
		{"unknown gateway", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
    gateways: [nope]
`, []string{`services[0].gateways[0]: unknown gateway "nope"; configured gateways: gw`}},
		{"short host and missing identities", `
services:
  - host: reviews
    ports: [{number: 80, protocol: http}]
`, []string{`services[0].host: "reviews" is not fully qualified`, `services[0].identities: at least one SPIFFE ID is required`}},
		{"subset on tcp", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 5432, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
    subsets: [{name: v1, hosts: [v1.a.example.com]}]
`, []string{`services[0].subsets[0]: subsets are selected by Host and need an http, http2 or grpc port`}},
		{"yaml syntax", "services: [\n", []string{"c.yaml:1: YAML syntax: "}},
		{"fractional port", `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80.5, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`, []string{"c.yaml:4: services[0].ports[0].number: 80.5 is not an integer; the field wants a whole number"}},
		{"quoted port", `
services:
  - host: a.ns.svc.cluster.local
    ports:
      - protocol: http
        number: "80"
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`, []string{`c.yaml:6: services[0].ports[0].number: "80" is a string; the field wants an integer: write 80 without quotes`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.doc), Options{Gateways: []string{"gw"}})
			if err == nil {
				t.Fatal("accepted a bad catalog")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not contain %q:\n%v", w, err)
				}
			}
		})
	}
}

func TestDaemonPortsAreReserved(t *testing.T) {
	doc := `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 8080, protocol: http}, {number: 9102, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`
	opts := Options{Reserved: []ReservedPort{{Port: 9102, Field: "metrics.address", Address: ":9102"}}}
	_, err := Parse("c.yaml", []byte(doc), opts)
	want := `c.yaml:4: services[0].ports[1].number: port 9102 is the daemon's own metrics.address (:9102), which the service's listener would collide with; give the service another port or move metrics.address`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("err = %v, want %q", err, want)
	}
	if _, err := Parse("c.yaml", []byte(doc), Options{}); err != nil {
		t.Fatalf("without reserved ports: %v", err)
	}
}

func TestHTTPPortsMayBeShared(t *testing.T) {
	doc := `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
  - host: b.ns.svc.cluster.local
    ports: [{number: 80, protocol: grpc}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`
	if _, err := Parse("c.yaml", []byte(doc), Options{}); err != nil {
		t.Fatalf("HTTP services sharing a port were rejected: %v", err)
	}
}

func TestEmptyFileIsNotAnEmptyCatalog(t *testing.T) {
	// A file caught half-written, truncated, or holding only comments must not withdraw every
	// service: each is an error that names the file and says how to serve none on purpose.
	cases := []struct{ name, doc, want string }{
		{"blank", " \n", `c.yaml: the catalog is empty`},
		{"only a comment", "# services moved to the fleet store\n", `c.yaml: the catalog is empty`},
		{"only a marker", "---\n", `c.yaml: the catalog is empty`},
		{"null document", "~\n", `c.yaml: the catalog is empty`},
		{"no services key", "{}\n", `c.yaml:1: no services key`},
		{"null services", "# the list\nservices:\n", `c.yaml:2: services is null`},
		{"null services, tilde", "services: ~\n", `c.yaml:1: services is null`},
		{"second document", goodCatalog + "---\n" + goodCatalog, `c.yaml:5: a second YAML document starts here`},
		{"empty first document", "---\n---\n" + goodCatalog, `c.yaml:2: a second YAML document starts here`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.doc), Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if !strings.Contains(tc.name, "document") && !strings.Contains(err.Error(), `write "services: []"`) {
				t.Errorf("the error does not say how to serve none deliberately: %v", err)
			}
		})
	}
	c, err := Parse("c.yaml", []byte("services: []\n"), Options{})
	if err != nil || len(c.Services) != 0 {
		t.Fatalf("explicitly empty catalog: %v", err)
	}
	if c, err := Parse("c.yaml", []byte("---\n"+goodCatalog+"...\n"), Options{}); err != nil || len(c.Services) != 1 {
		t.Fatalf("one document with explicit markers: %v", err)
	}
}

const goodCatalog = `services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`

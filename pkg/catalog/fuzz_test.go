package catalog

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// FuzzParse feeds the admin API's input to Parse. Any document either is refused with an error
// that names the file (and so where to look), or parses to a catalog that is valid, that Lookup
// finds every service of, and that parses again from its own YAML encoding to the same catalog
// (so what a peer re-encodes and another decodes is what the first one served).
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("../../examples/catalog.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	for _, s := range []string{
		"services: []\n",
		"services:\n  - host: reviews.default.svc.cluster.local\n    ports: [{number: 9080, protocol: http}]\n    identities: [spiffe://cluster.local/ns/default/sa/reviews]\n",
		"services:\n  - host: Reviews.Default.svc.cluster.local.\n    aliases: [reviews.example.internal]\n    ports: [{number: 9080, protocol: HTTP}, {number: 9443, protocol: grpc, name: grpc}]\n    identities: [spiffe://cluster.local/ns/default/sa/reviews, spiffe://cluster.local/ns/default/sa/reviews]\n    subsets: [{name: v2, hosts: [reviews-v2.example.internal]}]\n    allowedClients: [10.0.0.0/8, 10.0.0.0/8, \"::1/128\"]\n    gateways: [eastwest-a]\n",
		"services:\n  - host: db.default.svc.cluster.local\n    ports: [{number: 5432, protocol: tcp}]\n    identities: [spiffe://cluster.local/ns/default/sa/db]\n  - host: cache.default.svc.cluster.local\n    ports: [{number: 5432, protocol: tcp}]\n    identities: [spiffe://cluster.local/ns/default/sa/cache]\n",
		"services:\n  - host: shop.default.svc.cluster.local\n    ports: [{number: 50051, protocol: grpc}]\n    identities: [spiffe://cluster.local/ns/default/sa/shop]\n    transcoding: {descriptorSet: shop.pb, services: [shop.v1.Catalog], print: {protoFieldNames: true}}\n",
		"services:\n  - &a {host: a.b.c, ports: [{number: 1, protocol: tcp}], identities: [spiffe://td/x]}\n  - <<: *a\n    host: b.b.c\n",
		"services:\n  - host: a.b.c\n    host: a.b.d\n",
		"services:\n",
		"---\nservices: []\n---\nservices: []\n",
		"services: [{host: a.b.c, ports: [{number: 70000, protocol: tcp}], identities: [\"spiffe://td\"]}]\n",
		"services:\n\t- host: a\n",
		"",
	} {
		f.Add([]byte(s))
	}
	opts := Options{Gateways: []string{"eastwest-a", "eastwest-b"}, Reserved: []ReservedPort{{Port: 9090, Field: "metrics.address", Address: "0.0.0.0:9090"}}}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("fuzz.yaml", data, opts)
		if err != nil {
			if msg := err.Error(); !strings.HasPrefix(msg, "fuzz.yaml") {
				t.Fatalf("error does not name the file: %q", msg)
			}
			return
		}
		if err := c.Validate(opts); err != nil {
			t.Fatalf("a parsed catalog is invalid once normalized: %v", err)
		}
		for _, s := range c.Services {
			if got := c.Lookup(s.Host); got == nil || got.Host != s.Host {
				t.Fatalf("Lookup(%q) = %v", s.Host, got)
			}
		}
		out, err := yaml.Marshal(c)
		if err != nil {
			t.Fatalf("encode: %v", err)
		}
		again, err := Parse("again.yaml", out, opts)
		if err != nil {
			t.Fatalf("the catalog's own encoding is refused: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(normalForm(c), normalForm(again)) {
			t.Fatalf("parse of the re-encoded catalog differs:\n%+v\n%+v\n%s", c, again, out)
		}
	})
}

// normalForm treats empty and nil lists alike: YAML's omitempty writes neither.
func normalForm(c *Catalog) *Catalog {
	out := &Catalog{}
	for _, s := range c.Services {
		s = s.Clone()
		for _, l := range []*[]string{&s.Aliases, &s.Identities, &s.AllowedClients, &s.Gateways} {
			if len(*l) == 0 {
				*l = nil
			}
		}
		if len(s.Subsets) == 0 {
			s.Subsets = nil
		}
		out.Services = append(out.Services, s)
	}
	return out
}

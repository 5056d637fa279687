package catalog

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// writeSet compiles a .proto source into a descriptor set file in dir.
func writeSet(t *testing.T, dir, name, src string) {
	t.Helper()
	_, set, err := meshtest.CompileProto("x.proto", map[string]string{"x.proto": src})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), set, 0o644); err != nil {
		t.Fatal(err)
	}
}

const shopProto = `syntax = "proto3";
package shop.v1;
import "google/api/annotations.proto";
service Catalog {
  rpc Get(Req) returns (Req) { option (google.api.http) = { get: "/v1/items/{id}" }; }
  rpc Plain(Req) returns (Req);
}
message Req { string id = 1; }
`

// loadDoc writes doc as dir/name and loads it.
func loadDoc(t *testing.T, dir, name, doc string) (*Catalog, error) {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return Load(path, Options{})
}

func transcodingDoc(extra string) string {
	return `services:
  - host: shop.prod.svc.cluster.local
    ports: [{number: 8080, protocol: grpc}]
    identities: [spiffe://cluster.local/ns/prod/sa/shop]
` + extra
}

func TestTranscodingLoadsTheDescriptorSet(t *testing.T) {
	dir := t.TempDir()
	writeSet(t, dir, "shop.pb", shopProto)
	c, err := loadDoc(t, dir, "catalog.yaml", transcodingDoc(`    transcoding:
      descriptorSet: shop.pb
      services: [shop.v1.Catalog]
      print: {protoFieldNames: true, enumsAsInts: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	tr := c.Services[0].Transcoding
	if len(tr.Descriptor) == 0 || !tr.Print.ProtoFieldNames || !tr.Print.EnumsAsInts || tr.Print.EmitDefaults || len(tr.Services) != 1 {
		t.Fatalf("transcoding %+v", tr)
	}
	set, err := tr.Set()
	if err != nil {
		t.Fatal(err)
	}
	if b, vals := set.Match("GET", "/v1/items/42"); b == nil || b.GRPCPath != "/shop.v1.Catalog/Get" || vals[0] != "42" {
		t.Errorf("GET /v1/items/42 matched %+v %q", b, vals)
	}
	if b, _ := set.Match("POST", "/shop.v1.Catalog/Plain"); b == nil || b.Body != "*" {
		t.Errorf("a method without a rule is not POST /shop.v1.Catalog/Plain: %+v", b)
	}
	// A copy is independent of the original.
	cl := c.Services[0].Clone()
	cl.Transcoding.Services[0] = "x"
	if tr.Services[0] != "shop.v1.Catalog" {
		t.Error("Clone shares the services list")
	}
}

func TestTranscodingErrorsNameTheField(t *testing.T) {
	dir := t.TempDir()
	writeSet(t, dir, "shop.pb", shopProto)
	writeSet(t, dir, "dup.pb", `syntax = "proto3";
package shop.v1;
import "google/api/annotations.proto";
service Catalog {
  rpc Get(Req) returns (Req) { option (google.api.http) = { get: "/v1/items/{id}" }; }
  rpc Fetch(Req) returns (Req) { option (google.api.http) = { get: "/v1/items/{name}" }; }
}
message Req { string id = 1; string name = 2; }
`)
	if err := os.WriteFile(filepath.Join(dir, "junk.pb"), []byte("not a descriptor set"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, extra string
		want        []string
	}{
		{"missing file", `    transcoding: {descriptorSet: nope.pb, services: [shop.v1.Catalog]}
`, []string{"c.yaml:5: services[0].transcoding.descriptorSet: open ", "nope.pb: no such file or directory; build it with protoc --include_imports"}},
		{"service not in set", `    transcoding: {descriptorSet: shop.pb, services: [shop.v1.Catalog, Catalog]}
`, []string{`services[0].transcoding.services[1]: service "Catalog" is not in the descriptor set (it has shop.v1.Catalog); write the full name`}},
		{"same path and verb", `    transcoding: {descriptorSet: dup.pb, services: [shop.v1.Catalog]}
`, []string{"services[0].transcoding.services[0]: shop.v1.Catalog.Get and shop.v1.Catalog.Fetch are both bound to GET /v1/items/*"}},
		{"not a descriptor set", `    transcoding: {descriptorSet: junk.pb, services: [shop.v1.Catalog]}
`, []string{"services[0].transcoding.descriptorSet: junk.pb: not a serialized FileDescriptorSet"}},
		{"listed twice", `    transcoding: {descriptorSet: shop.pb, services: [shop.v1.Catalog, shop.v1.Catalog]}
`, []string{`services[0].transcoding.services[1]: service "shop.v1.Catalog" is listed twice`}},
		{"no services", `    transcoding: {descriptorSet: shop.pb}
`, []string{"services[0].transcoding.services: at least one gRPC service to expose is required"}},
		{"no descriptor set", `    transcoding: {services: [shop.v1.Catalog]}
`, []string{"services[0].transcoding.descriptorSet: required"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadDoc(t, dir, "c.yaml", transcodingDoc(tc.extra))
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	t.Run("not grpc", func(t *testing.T) {
		doc := strings.Replace(transcodingDoc("    transcoding: {descriptorSet: shop.pb, services: [shop.v1.Catalog]}\n"), "protocol: grpc", "protocol: http2", 1)
		_, err := loadDoc(t, dir, "c.yaml", doc)
		if err == nil || !strings.Contains(err.Error(), "services[0].transcoding: transcoding translates REST/JSON to gRPC and needs a grpc port") {
			t.Errorf("got %v", err)
		}
	})
}

// A document parsed from memory (the admin API's apply) never makes the daemon open a file.
func TestParseReadsNoDescriptorFile(t *testing.T) {
	dir := t.TempDir()
	writeSet(t, dir, "shop.pb", shopProto)
	_, err := Parse(filepath.Join(dir, "c.yaml"), []byte(transcodingDoc("    transcoding: {descriptorSet: "+filepath.Join(dir, "shop.pb")+", services: [shop.v1.Catalog]}\n")), Options{})
	if err == nil || !strings.Contains(err.Error(), "was not read: descriptor sets are read from catalog files") {
		t.Errorf("got %v", err)
	}
}

package strictyaml

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// fuzzDoc has a field of every kind checkNode knows, so the fuzzer can reach each check.
type fuzzDoc struct {
	Name     string              `yaml:"name"`
	Port     uint16              `yaml:"port"`
	Count    int                 `yaml:"count"`
	Small    int8                `yaml:"small"`
	Ratio    float64             `yaml:"ratio"`
	On       bool                `yaml:"on"`
	Maybe    *bool               `yaml:"maybe"`
	Timeout  time.Duration       `yaml:"timeout"`
	Names    []string            `yaml:"names"`
	Ports    []testPort          `yaml:"ports"`
	Pair     [2]int              `yaml:"pair"`
	Named    map[string]testPort `yaml:"named"`
	Labels   map[string]string   `yaml:"labels"`
	Listen   *testListen         `yaml:"listen"`
	Custom   fuzzUpper           `yaml:"custom"`
	Inline   fuzzInline          `yaml:",inline"`
	Ignored  string              `yaml:"-"`
	Untagged string
}

type fuzzInline struct {
	Region string `yaml:"region"`
}

// fuzzUpper decodes itself (an Unmarshaler), which checkNode leaves alone.
type fuzzUpper string

func (u *fuzzUpper) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return errors.New("custom: a single value goes here")
	}
	*u = fuzzUpper(strings.ToUpper(n.Value))
	return nil
}

// FuzzDecode: any document either decodes, and then holds no field yaml's own strict decoder
// would call unknown and decodes again from its own encoding to the same value, or is refused with
// errors that each name the file; either way looking up any field path never panics.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		"name: web\nport: 8080\ncount: -3\nsmall: 7\nratio: 0.5\non: true\nmaybe: false\ntimeout: 5s\n",
		"names: [a, b]\nports:\n  - number: 80\n    name: http\npair: [1, 2]\nnamed:\n  a: {number: 1}\nlabels: {x: y}\n",
		"listen: {address: 0.0.0.0, accessLog: true, connectTimeout: 2m}\ncustom: abc\nregion: eu\nuntagged: u\n",
		"base: &b {number: 1}\n",
		"ports:\n  - &p {number: 1, name: a}\n  - *p\n  - <<: *p\n    name: b\n",
		"port: 80.5\ncount: many\non: yes\ntimeout: 5\nnames: web\nlisten: [a]\n",
		"port: \"80\"\nsmall: 300\nport: 1\nnamed: {a: {numbr: 1}}\n",
		"port: 1\n---\nport: 2\n",
		"ports:\n  - number: 1\n   name: a\n",
		"name: \"open\n",
		"names: [a, b\n",
		"\tname: x\n",
		"~\n",
		"",
		"- a\n- b\n",
		"ratio: .nan\nmaybe: ~\npair: [1, 2, 3]\n",
	} {
		f.Add([]byte(s), "ports[0].name")
	}
	f.Fuzz(func(t *testing.T, data []byte, path string) {
		var out fuzzDoc
		doc, err := Decode("f.yaml", data, &out)
		if doc != nil {
			doc.Line(path)
			doc.Field(path)
		}
		if err != nil {
			if !strings.HasPrefix(err.Error(), "f.yaml") {
				t.Fatalf("error does not name the file: %q", err)
			}
			var es Errors
			if errors.As(err, &es) {
				for _, e := range es {
					if e.File != "f.yaml" || e.Line < 0 || e.Message == "" {
						t.Fatalf("error without file, line or words: %+v", e)
					}
				}
			}
			if doc != nil && doc.Check(err, Problems{{Field: path, Message: "m"}}) == nil {
				t.Fatal("Check drops the decode errors")
			}
			return
		}
		if doc == nil {
			t.Fatal("no error and no document")
		}
		strict := yaml.NewDecoder(bytes.NewReader(data))
		strict.KnownFields(true)
		var again fuzzDoc
		if err := strict.Decode(&again); err != nil {
			t.Fatalf("accepted what yaml's strict decoder refuses: %v", err)
		}
		enc, err := yaml.Marshal(&out)
		if err != nil {
			t.Fatalf("encode: %v", err)
		}
		var back fuzzDoc
		if _, err := Decode("again.yaml", enc, &back); err != nil {
			t.Fatalf("the value's own encoding is refused: %v\n%s", err, enc)
		}
		if enc2, _ := yaml.Marshal(&back); !bytes.Equal(enc, enc2) {
			t.Fatalf("decoding the encoding changes the value:\n%s\n%s", enc, enc2)
		}
	})
}

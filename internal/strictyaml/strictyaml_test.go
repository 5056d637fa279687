package strictyaml

import (
	"errors"
	"strings"
	"testing"
)

type testPort struct {
	Number uint32 `yaml:"number"`
	Name   string `yaml:"name"`
}

type testDoc struct {
	Port  uint32     `yaml:"port"`
	Ports []testPort `yaml:"ports"`
	Count *int       `yaml:"count"`
	Named map[string]testPort
}

func TestOneDocumentOnly(t *testing.T) {
	cases := []struct{ name, doc, want string }{
		{"second document", "port: 1\n---\nport: 2\n", "f.yaml:2: a second YAML document starts here"},
		{"empty first document", "---\n---\nport: 2\n", "f.yaml:2: a second YAML document starts here"},
		{"trailing marker", "port: 1\n\n# more\n---\n", "f.yaml:4: a second YAML document starts here"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out testDoc
			_, err := Decode("f.yaml", []byte(tc.doc), &out)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	var out testDoc
	if _, err := Decode("f.yaml", []byte("---\nport: 1\n...\n"), &out); err != nil || out.Port != 1 {
		t.Fatalf("one document with explicit markers: %v, %+v", err, out)
	}
}

func TestNoDocumentIsEmpty(t *testing.T) {
	for _, doc := range []string{"", " \n\n", "# only a comment\n", "---\n", "---\n# c\n...\n", "null\n", "~\n"} {
		var out testDoc
		_, err := Decode("f.yaml", []byte(doc), &out)
		if !errors.Is(err, ErrEmpty) || !strings.HasPrefix(err.Error(), "f.yaml: ") {
			t.Errorf("%q: err = %v, want ErrEmpty naming the file", doc, err)
		}
	}
}

func TestIntegerFieldsWantIntegers(t *testing.T) {
	cases := []struct{ name, doc, want string }{
		{"float", "port: 80.5\n", `f.yaml:1: port: 80.5 is not an integer; the field wants a whole number, e.g. 8080`},
		{"whole float", "ports: [{number: 80.0}]\n", `f.yaml:1: ports[0].number: 80.0 is not an integer`},
		{"quoted", "ports:\n  - name: a\n    number: \"80\"\n", `f.yaml:3: ports[0].number: "80" is a string; the field wants an integer: write 80 without quotes`},
		{"word", "count: many\n", `f.yaml:1: count: "many" is not an integer`},
		{"map value", "named:\n  a: {number: 1e3}\n", `f.yaml:2: named.a.number: 1e3 is not an integer`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out testDoc
			_, err := Decode("f.yaml", []byte(tc.doc), &out)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	var out testDoc
	if _, err := Decode("f.yaml", []byte("port: 0x50\nports: [{number: 1_000}]\ncount: ~\n"), &out); err != nil || out.Port != 80 || out.Ports[0].Number != 1000 {
		t.Fatalf("YAML integers rejected: %v, %+v", err, out)
	}
}

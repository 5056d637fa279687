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

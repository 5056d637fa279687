package strictyaml

import (
	"errors"
	"strings"
	"testing"
	"time"
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

type testListen struct {
	Address   string        `yaml:"address"`
	AccessLog *bool         `yaml:"accessLog"`
	Timeout   time.Duration `yaml:"connectTimeout"`
}

type testConfig struct {
	Listen testListen `yaml:"listen"`
	Ports  []testPort `yaml:"ports"`
	Names  []string   `yaml:"names"`
}

// TestProblemsNameFieldsNotGoTypes: every problem in one run, each at its own line and field
// path, in words about YAML (no Go type names), with the fix.
func TestProblemsNameFieldsNotGoTypes(t *testing.T) {
	doc := `listen:
  adress: 0.0.0.0
  AccessLog: yes
  connectTimeout: 5
ports:
  - number: nine
    name: [a]
names: web
listen2: {}
`
	var out testConfig
	d, err := Decode("f.yaml", []byte(doc), &out)
	if d == nil || err == nil {
		t.Fatalf("doc %v, err %v", d, err)
	}
	want := []string{
		`f.yaml:2: listen.adress: unknown field "adress"; did you mean "address"?`,
		`f.yaml:3: listen.AccessLog: unknown field "AccessLog"; did you mean "accessLog"?`,
		`f.yaml:4: listen.connectTimeout: 5 is a number without a unit; write a duration such as 5s, 5ms or 2m`,
		`f.yaml:6: ports[0].number: "nine" is not an integer; the field wants a whole number, e.g. 8080`,
		`f.yaml:7: ports[0].name: a single value (text) goes here, not a list`,
		`f.yaml:8: names: a list goes here ("- item" lines, or [a, b]), not "web"`,
		`f.yaml:9: listen2: unknown field "listen2"; did you mean "listen"?`,
	}
	if got := err.Error(); got != strings.Join(want, "\n") {
		t.Fatalf("got:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
	var es Errors
	if !errors.As(err, &es) || len(es) != len(want) || es[3].Line != 6 || es[3].Path != "ports[0].number" {
		t.Fatalf("structured errors: %+v", es)
	}
	for _, bad := range []string{"uint32", "time.Duration", "strictyaml.", "!!str"} {
		if strings.Contains(err.Error(), bad) {
			t.Errorf("message names a Go type or YAML tag %q", bad)
		}
	}
}

func TestUnknownFieldWithoutNearName(t *testing.T) {
	var out testConfig
	_, err := Decode("f.yaml", []byte("listen: {color: red}\n"), &out)
	if err == nil || !strings.Contains(err.Error(), `f.yaml:1: listen.color: unknown field "color"; the fields of listen are address, accessLog, connectTimeout`) {
		t.Fatalf("err = %v", err)
	}
}

func TestDuplicateKey(t *testing.T) {
	var out testConfig
	_, err := Decode("f.yaml", []byte("listen:\n  address: a\n  address: b\n"), &out)
	if err == nil || !strings.Contains(err.Error(), "f.yaml:3: listen.address: given twice (first on line 2)") {
		t.Fatalf("err = %v", err)
	}
}

// TestDuplicateKeyStopsValidation: a key given twice stops yaml's decode part way, so the
// caller's validation of what was decoded (here: a field found missing) is not reported beside it.
func TestDuplicateKeyStopsValidation(t *testing.T) {
	var out testConfig
	doc, err := Decode("f.yaml", []byte("listen: {address: a}\nnames: [x]\nlisten: {address: b}\n"), &out)
	if doc == nil || err == nil {
		t.Fatalf("doc %v, err %v", doc, err)
	}
	var p Problems
	p.Addf("names", "required") // what validating the partly decoded value finds
	got := doc.Check(err, p)
	if got == nil || !strings.Contains(got.Error(), "f.yaml:3: listen: given twice (first on line 1)") || strings.Contains(got.Error(), "required") {
		t.Fatalf("Check = %v; want only the key given twice", got)
	}
}

// TestSyntaxErrorLine: a syntax error is reported at the offending line, not where the enclosing
// block starts.
func TestSyntaxErrorLine(t *testing.T) {
	cases := []struct {
		doc  string
		line string
	}{
		{"ports:\n  - number: 1\n    name: a\n   protocol: http\n", "f.yaml:4: YAML syntax: "},
		{"ports:\n  - name: a\n    number: [1\n    x: 2\n", "f.yaml:4: YAML syntax: "},
		{"listen:\n  address: a\nports:\n  - number: 1\n    name: b\n  names: [x]\n", "f.yaml:6: YAML syntax: "},
		{"ports:\n\t- number: 1\n", "a tab cannot indent YAML"},
	}
	for _, tc := range cases {
		var out testConfig
		d, err := Decode("f.yaml", []byte(tc.doc), &out)
		if d != nil || err == nil || !strings.Contains(err.Error(), tc.line) {
			t.Errorf("%q: err = %v, want %q", tc.doc, err, tc.line)
		}
	}
}

// TestCheckDropsProblemsOfRefusedFields: a validation problem about a field Decode refused only
// describes the zero value left there.
func TestCheckDropsProblemsOfRefusedFields(t *testing.T) {
	var out testConfig
	d, err := Decode("f.yaml", []byte("ports:\n  - number: nine\n    name: \"\"\n"), &out)
	var p Problems
	p.Addf("ports[0].number", "0 is not a valid port")
	p.Addf("ports[0].name", "required")
	got := d.Check(err, p)
	if got == nil || strings.Contains(got.Error(), "0 is not a valid port") || !strings.Contains(got.Error(), "f.yaml:3: ports[0].name: required") ||
		!strings.Contains(got.Error(), `f.yaml:2: ports[0].number: "nine" is not an integer`) {
		t.Fatalf("got %v", got)
	}
}

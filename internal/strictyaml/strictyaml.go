// Package strictyaml decodes YAML files strictly (unknown fields are errors) and turns validation
// problems into errors that name the file, the line and the field, so an operator can fix a bad
// edit without guessing.
package strictyaml

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Doc is a decoded YAML document kept for line look-ups.
type Doc struct {
	File string
	root *yaml.Node
}

// ErrEmpty is wrapped by Decode's error for a file that holds no YAML document, or only a null
// one: empty, only comments, a lone "---", "~". Callers add what to write instead, since an empty
// file is more often a file caught half-written or truncated than a deliberate choice.
var ErrEmpty = errors.New("the file holds no YAML document (it is empty, only comments, or null)")

// Decode parses data, which must hold exactly one YAML document, into out. Unknown fields, type
// mismatches and syntax errors are returned as errors prefixed with the file name and line. A
// second document is an error (a decoder would silently ignore it), and so is a file with no
// document or a null one (ErrEmpty).
func Decode(file string, data []byte, out any) (*Doc, error) {
	doc := &Doc{File: file}
	root, err := oneDocument(file, data)
	if err != nil {
		return nil, err
	}
	doc.root = root
	// yaml truncates a float into an integer field (80.5 becomes port 80) and says nothing of the
	// field when a string is given instead: check the integer fields first.
	var p Problems
	checkIntegers(root, reflect.TypeOf(out), "", &p)
	if err := p.In(doc); err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(out); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			var errs []error
			for _, e := range te.Errors {
				errs = append(errs, fmt.Errorf("%s:%s", file, explainTypeError(e)))
			}
			return nil, errors.Join(errs...)
		}
		return nil, fmt.Errorf("%s:%s", file, cleanYAMLError(err.Error()))
	}
	return doc, nil
}

// oneDocument returns the content of data's only document, refusing a second one and an empty or
// null one. It reads at most two documents.
func oneDocument(file string, data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var first, second yaml.Node
	if err := dec.Decode(&first); errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%s: %w", file, ErrEmpty)
	} else if err != nil {
		return nil, fmt.Errorf("%s:%s", file, cleanYAMLError(err.Error()))
	}
	switch err := dec.Decode(&second); {
	case err == nil:
		// The document node's line is its "---" marker.
		return nil, fmt.Errorf("%s:%d: a second YAML document starts here (\"---\"); this file holds exactly one document, and one after the first would be ignored: merge it into the first or move it to a file of its own", file, second.Line)
	case !errors.Is(err, io.EOF):
		return nil, fmt.Errorf("%s:%s", file, cleanYAMLError(err.Error()))
	}
	if len(first.Content) == 0 || first.Content[0].Kind == yaml.ScalarNode && first.Content[0].ShortTag() == "!!null" {
		return nil, fmt.Errorf("%s: %w", file, ErrEmpty)
	}
	return first.Content[0], nil
}

var (
	durationType    = reflect.TypeOf(time.Duration(0))
	unmarshalerType = reflect.TypeOf((*yaml.Unmarshaler)(nil)).Elem()
)

// checkIntegers walks n alongside the Go type t and records a problem for every integer field
// whose value is not a YAML integer (a float such as 80.5 or 80.0, a quoted "80", a word). Null
// values are left to validation (a required field), anything else that does not fit t to the
// decoder's own errors.
func checkIntegers(n *yaml.Node, t reflect.Type, path string, p *Problems) {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n == nil || t == nil || t == durationType || reflect.PointerTo(t).Implements(unmarshalerType) {
		return
	}
	join := func(key string) string {
		if path == "" {
			return key
		}
		return path + "." + key
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if n.Kind != yaml.ScalarNode {
			return
		}
		switch n.ShortTag() {
		case "!!int", "!!null":
		case "!!str":
			if _, err := strconv.ParseInt(strings.TrimSpace(n.Value), 10, 64); err == nil {
				p.Addf(path, "%q is a string; the field wants an integer: write %s without quotes", n.Value, strings.TrimSpace(n.Value))
			} else {
				p.Addf(path, "%q is not an integer; the field wants a whole number, e.g. 8080", n.Value)
			}
		default:
			p.Addf(path, "%s is not an integer; the field wants a whole number, e.g. 8080", n.Value)
		}
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			key := n.Content[i].Value
			if f, ok := yamlField(t, key); ok {
				checkIntegers(n.Content[i+1], f.Type, join(key), p)
			}
		}
	case reflect.Slice, reflect.Array:
		if n.Kind != yaml.SequenceNode {
			return
		}
		for i, item := range n.Content {
			checkIntegers(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i), p)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			checkIntegers(n.Content[i+1], t.Elem(), join(n.Content[i].Value), p)
		}
	}
}

// yamlField finds the struct field that the mapping key decodes into, as the yaml package names
// fields: the yaml tag's name, else the lower-cased field name; inlined structs are searched too.
func yamlField(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if strings.Contains(","+opts+",", ",inline,") {
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				if inner, ok := yamlField(ft, key); ok {
					return inner, true
				}
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		if name == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// Field reports whether the mapping key at path (e.g. "services") is present, whether its value
// is null ("services:" with nothing after it, or "~"), and its line.
func (d *Doc) Field(path string) (present, null bool, line int) {
	n := d.node(path)
	if n == nil {
		return false, false, 0
	}
	return true, n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null", n.Line
}

var (
	unknownField = regexp.MustCompile(`^line (\d+): field (\S+) not found in type (\S+)$`)
	lineMsg      = regexp.MustCompile(`^line (\d+): (.*)$`)
)

// explainTypeError rewrites yaml's messages into "LINE: what is wrong; how to fix" (the leading
// space stands where no line is known, so callers can write "file:" before it).
func explainTypeError(msg string) string {
	if m := unknownField.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("%s: unknown field %q (in %s); check its spelling and indentation against the documented fields", m[1], m[2], m[3])
	}
	return cleanYAMLError(msg)
}

func cleanYAMLError(msg string) string {
	msg = strings.TrimPrefix(msg, "yaml: ")
	if m := lineMsg.FindStringSubmatch(msg); m != nil {
		return m[1] + ": " + m[2]
	}
	return " " + msg
}

var pathToken = regexp.MustCompile(`([^.\[\]]+)|\[(\d+)\]`)

// Line returns the line of the node at a field path such as "services[2].ports[0].number", or of
// its deepest existing ancestor; 0 when unknown.
func (d *Doc) Line(path string) int {
	_, line := d.walk(path)
	return line
}

// node returns the node at path, or nil when it does not exist.
func (d *Doc) node(path string) *yaml.Node {
	n, _ := d.walk(path)
	return n
}

// walk follows path from the root: the node there (nil if missing) and the line of the deepest
// node found on the way.
func (d *Doc) walk(path string) (*yaml.Node, int) {
	if d == nil || d.root == nil {
		return nil, 0
	}
	n := d.root
	line := n.Line
	for _, m := range pathToken.FindAllStringSubmatch(path, -1) {
		var next *yaml.Node
		switch {
		case m[2] != "" && n.Kind == yaml.SequenceNode:
			i, _ := strconv.Atoi(m[2])
			if i < len(n.Content) {
				next = n.Content[i]
			}
		case m[1] != "" && n.Kind == yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				if n.Content[i].Value == m[1] {
					next = n.Content[i+1]
					break
				}
			}
		}
		if next == nil {
			return nil, line
		}
		n, line = next, next.Line
	}
	return n, line
}

// Problem is one validation failure: the field path and what to do about it.
type Problem struct {
	Field   string
	Message string
}

func (p Problem) Error() string { return p.Field + ": " + p.Message }

// Problems collects validation failures.
type Problems []Problem

// Addf records a problem with field, e.g. p.Addf("services[1].host", "%q is not a DNS name", h).
func (p *Problems) Addf(field, format string, args ...any) {
	*p = append(*p, Problem{Field: field, Message: fmt.Sprintf(format, args...)})
}

// Err joins the problems into one error (nil when there are none), without file positions.
func (p Problems) Err() error {
	if len(p) == 0 {
		return nil
	}
	errs := make([]error, len(p))
	for i, pr := range p {
		errs[i] = pr
	}
	return errors.Join(errs...)
}

// In places the problems in doc: each becomes "file:line: field: message".
func (p Problems) In(doc *Doc) error {
	if len(p) == 0 {
		return nil
	}
	errs := make([]error, len(p))
	for i, pr := range p {
		if line := doc.Line(pr.Field); line > 0 {
			errs[i] = fmt.Errorf("%s:%d: %s", doc.File, line, pr)
		} else {
			errs[i] = fmt.Errorf("%s: %s", doc.File, pr)
		}
	}
	return errors.Join(errs...)
}

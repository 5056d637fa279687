// Package strictyaml decodes YAML files strictly (unknown fields are errors) and turns validation
// problems into errors that name the file, the line and the field, so an operator can fix a bad
// edit without guessing.
package strictyaml

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Doc is a decoded YAML document kept for line look-ups.
type Doc struct {
	File string
	root *yaml.Node
}

// Decode parses data into out. Unknown fields, type mismatches and syntax errors are returned as
// errors prefixed with the file name and line. An empty document decodes to out's zero value.
func Decode(file string, data []byte, out any) (*Doc, error) {
	doc := &Doc{File: file}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("%s:%s", file, cleanYAMLError(err.Error()))
	}
	if len(root.Content) > 0 {
		doc.root = root.Content[0]
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
	if d == nil || d.root == nil {
		return 0
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
			break
		}
		n, line = next, next.Line
	}
	return line
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

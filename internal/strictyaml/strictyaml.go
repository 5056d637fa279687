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
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/agext/levenshtein"
	goccy "github.com/goccy/go-yaml"
	goccyparser "github.com/goccy/go-yaml/parser"
	"go.yaml.in/yaml/v3"
)

// Doc is a decoded YAML document kept for line look-ups.
type Doc struct {
	File string
	root *yaml.Node
	// incomplete is set when decoding stopped part way (a key given twice leaves its mapping out):
	// the values decoded are then not the file's, and validating them would only mislead.
	incomplete bool
}

// ErrEmpty is wrapped by Decode's error for a file that holds no YAML document, or only a null
// one: empty, only comments, a lone "---", "~". Callers add what to write instead, since an empty
// file is more often a file caught half-written or truncated than a deliberate choice.
var ErrEmpty = errors.New("the file holds no YAML document (it is empty, only comments, or null)")

// Decode parses data, which must hold exactly one YAML document, into out, checking every node
// against out's Go type first: an unknown field (with the closest known names), a value of the
// wrong kind (a word where a number goes, 80.5 in an integer field, 5 for a duration), a
// duplicate key. Each problem is an *Error naming the file, the line, the field path and the
// fix, and all of them are returned together (as Errors).
//
// A second document is an error (a decoder would silently ignore it), and so is a file with no
// document or a null one (ErrEmpty). The returned Doc is nil only when the file could not be
// parsed at all (a syntax error, none or several documents); with problems of kind alone it is
// returned, with out decoded as far as it fits, so callers can report their own validation
// problems in the same run (see Doc.Check).
func Decode(file string, data []byte, out any) (*Doc, error) {
	root, err := oneDocument(file, data)
	if err != nil {
		return nil, err
	}
	doc := &Doc{File: file, root: root}
	var p Problems
	checkNode(root, reflect.TypeOf(out), "", &p)
	// Decoding the node parsed above rather than data again halves the cost of a large file
	// (a 10,000-service catalog is about a megabyte of YAML).
	err = root.Decode(out)
	var te *yaml.TypeError
	// yaml refuses a whole mapping that has a key twice before decoding any of it.
	doc.incomplete = err != nil && !errors.Is(err, io.EOF) &&
		(!errors.As(err, &te) || slices.ContainsFunc(te.Errors, func(e string) bool { return strings.Contains(e, "already defined") }))
	if err != nil && !errors.Is(err, io.EOF) && len(p) == 0 {
		// What the walk above let through: yaml's own words, with its line.
		if !errors.As(err, &te) {
			return nil, syntaxError(file, data, err)
		}
		var es Errors
		for _, e := range te.Errors {
			es = append(es, lineError(file, e))
		}
		return doc, es
	}
	if len(p) == 0 {
		return doc, nil
	}
	return doc, p.errors(doc)
}

// Check is what a file holds wrong: the problems Decode found (decodeErr) and then the caller's
// validation problems p, in one list. A validation problem at or below a field Decode already
// refused is dropped, since it only describes the zero value left there.
func (d *Doc) Check(decodeErr error, p Problems) error {
	var out Errors
	var refused []string
	var es Errors
	if errors.As(decodeErr, &es) {
		out = append(out, es...)
		for _, e := range es {
			refused = append(refused, e.Path)
		}
	} else if decodeErr != nil {
		return decodeErr
	}
	if d.incomplete {
		refused = append(refused, "") // everything: the values checked are not the file's
	}
	for _, e := range p.errors(d) {
		if !under(e.Path, refused) {
			out = append(out, e)
		}
	}
	if len(out) == 0 {
		return nil
	}
	slices.SortStableFunc(out, func(a, b *Error) int { return a.Line - b.Line })
	return out
}

// under reports whether path is one of paths or inside one of them.
func under(path string, paths []string) bool {
	for _, q := range paths {
		if q == "" || path == q || strings.HasPrefix(path, q+".") || strings.HasPrefix(path, q+"[") {
			return true
		}
	}
	return false
}

// oneDocument returns the content of data's only document, refusing a second one and an empty or
// null one. It reads at most two documents.
func oneDocument(file string, data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var first, second yaml.Node
	if err := dec.Decode(&first); errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%s: %w", file, ErrEmpty)
	} else if err != nil {
		return nil, syntaxError(file, data, err)
	}
	switch err := dec.Decode(&second); {
	case err == nil:
		// The document node's line is its "---" marker.
		return nil, Errors{{File: file, Line: second.Line, Message: "a second YAML document starts here (\"---\"); this file holds exactly one document, and one after the first would be ignored: merge it into the first or move it to a file of its own"}}
	case !errors.Is(err, io.EOF):
		return nil, syntaxError(file, data, err)
	}
	if len(first.Content) == 0 || first.Content[0].Kind == yaml.ScalarNode && first.Content[0].ShortTag() == "!!null" {
		return nil, fmt.Errorf("%s: %w", file, ErrEmpty)
	}
	return first.Content[0], nil
}

// syntaxError reports a YAML syntax error at the line where it is. yaml names the line where the
// enclosing block starts (a mis-indented line 5 of a list that starts on line 2 is "line 2"), so
// the line and words come from a second parser that points at the offending token; yaml's own
// are kept when that parser finds nothing wrong.
func syntaxError(file string, data []byte, err error) error {
	e := lineError(file, err.Error())
	if _, perr := goccyparser.ParseBytes(data, 0); perr != nil {
		var se *goccy.SyntaxError
		if errors.As(perr, &se) && se.Token != nil && se.Token.Position != nil {
			e.Line, e.Message = se.Token.Position.Line, se.Message
		}
	}
	hint := "check this line's indentation against the lines above it (YAML nests by indentation, with spaces only)"
	switch {
	case strings.Contains(e.Message, "\t"), strings.Contains(e.Message, "cannot start any token") && bytes.Contains(data, []byte("\t")):
		hint = "a tab cannot indent YAML: indent with spaces"
	case strings.Contains(e.Message, "quote"), strings.Contains(e.Message, "quoted"):
		hint = "close the quote on the same line, or quote the whole value"
	case strings.Contains(e.Message, "']'"), strings.Contains(e.Message, "'}'"):
		hint = "close the [ ] or { } opened on an earlier line"
	}
	e.Message = "YAML syntax: " + e.Message + "; " + hint
	return Errors{e}
}

var lineMsg = regexp.MustCompile(`^line (\d+): (.*)$`)

// lineError turns one of yaml's messages ("yaml: line 3: ...") into an Error.
func lineError(file, msg string) *Error {
	msg = strings.TrimPrefix(msg, "yaml: ")
	e := &Error{File: file, Message: msg}
	if m := lineMsg.FindStringSubmatch(msg); m != nil {
		e.Line, _ = strconv.Atoi(m[1])
		e.Message = m[2]
	}
	return e
}

var (
	durationType    = reflect.TypeOf(time.Duration(0))
	unmarshalerType = reflect.TypeOf((*yaml.Unmarshaler)(nil)).Elem()
)

// kindOf names a node's kind as an operator sees it.
func kindOf(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping (key: value)"
	case yaml.SequenceNode:
		return "a list"
	}
	return fmt.Sprintf("%q", n.Value)
}

// checkNode walks n alongside the Go type t and records a problem for every node that does not
// fit: unknown and duplicate keys, a list or mapping where a value goes (and the other way
// round), a value of the wrong kind. Null values are left to validation (a required field).
func checkNode(n *yaml.Node, t reflect.Type, path string, p *Problems) {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n == nil || t == nil || reflect.PointerTo(t).Implements(unmarshalerType) {
		return
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return
	}
	join := func(key string) string {
		if path == "" {
			return key
		}
		return path + "." + key
	}
	at := func(format string, args ...any) { p.add(path, n.Line, format, args...) }
	if t == durationType {
		switch {
		case n.Kind != yaml.ScalarNode:
			at("a duration goes here, not %s; write e.g. 5s, 500ms or 2m", kindOf(n))
		case n.ShortTag() == "!!int" || n.ShortTag() == "!!float":
			at("%s is a number without a unit; write a duration such as %ss, %sms or 2m", n.Value, n.Value, n.Value)
		default:
			if _, err := time.ParseDuration(n.Value); err != nil {
				at("%q is not a duration; write e.g. 5s, 500ms or 2m (units ns, us, ms, s, m, h)", n.Value)
			}
		}
		return
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if n.Kind != yaml.ScalarNode {
			at("a whole number goes here, not %s", kindOf(n))
			return
		}
		switch n.ShortTag() {
		case "!!int":
			if err := n.Decode(reflect.New(t).Interface()); err != nil {
				if strings.HasPrefix(n.Value, "-") && t.Kind() >= reflect.Uint {
					at("%s is negative; the field wants a whole number from 0", n.Value)
				} else {
					at("%s is out of range for this field (at most %d bits)", n.Value, t.Bits())
				}
			}
		case "!!str":
			if _, err := strconv.ParseInt(strings.TrimSpace(n.Value), 10, 64); err == nil {
				at("%q is a string; the field wants an integer: write %s without quotes", n.Value, strings.TrimSpace(n.Value))
			} else {
				at("%q is not an integer; the field wants a whole number, e.g. 8080", n.Value)
			}
		default:
			at("%s is not an integer; the field wants a whole number, e.g. 8080", n.Value)
		}
	case reflect.Float32, reflect.Float64:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" && n.ShortTag() != "!!float" {
			at("%s is not a number; the field wants a number, e.g. 0.5", kindOf(n))
		}
	case reflect.Bool:
		switch {
		case n.Kind != yaml.ScalarNode:
			at("true or false goes here, not %s", kindOf(n))
		case n.ShortTag() != "!!bool":
			at("%q is not true or false; write true or false (YAML 1.2 reads yes, no, on and off as text)", n.Value)
		}
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			at("a single value (text) goes here, not %s", kindOf(n))
		}
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			at("a mapping of fields (%s) goes here, not %s", strings.Join(fieldNames(t), ", "), kindOf(n))
			return
		}
		checkKeys(n, path, p, func(key *yaml.Node, value *yaml.Node) {
			if key.Value == "<<" { // a merge key: the merged mapping's fields are this struct's
				checkNode(value, t, path, p)
				return
			}
			f, ok := yamlField(t, key.Value)
			if !ok {
				p.add(join(key.Value), key.Line, "%s", unknownField(key.Value, path, t))
				return
			}
			checkNode(value, f.Type, join(key.Value), p)
		})
	case reflect.Slice, reflect.Array:
		if n.Kind != yaml.SequenceNode {
			at("a list goes here (\"- item\" lines, or [a, b]), not %s", kindOf(n))
			return
		}
		for i, item := range n.Content {
			checkNode(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i), p)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			at("a mapping (key: value) goes here, not %s", kindOf(n))
			return
		}
		checkKeys(n, path, p, func(key, value *yaml.Node) { checkNode(value, t.Elem(), join(key.Value), p) })
	}
}

// checkKeys calls each for every key of a mapping, refusing a key given twice.
func checkKeys(n *yaml.Node, path string, p *Problems, each func(key, value *yaml.Node)) {
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		key := n.Content[i]
		if first, ok := seen[key.Value]; ok && key.Value != "<<" {
			name := key.Value
			if path != "" {
				name = path + "." + key.Value
			}
			p.add(name, key.Line, "given twice (first on line %d); keep one, since only one of them would count", first)
			continue
		}
		seen[key.Value] = key.Line
		each(key, n.Content[i+1])
	}
}

// unknownField says what is wrong with key in the struct t at path: the closest documented
// field name (a typo, another case), or all of them.
func unknownField(key, path string, t reflect.Type) string {
	where := "at the top level"
	if path != "" {
		where = "of " + path
	}
	names := fieldNames(t)
	if s := closest(key, names); s != "" {
		return fmt.Sprintf("unknown field %q; did you mean %q?", key, s)
	}
	return fmt.Sprintf("unknown field %q; the fields %s are %s (check the spelling, and the indentation: a line indented too little or too much lands in another mapping)", key, where, strings.Join(names, ", "))
}

// closest is the field name key most likely meant: equal but for case, or within a few edits.
func closest(key string, names []string) string {
	best, bestD := "", 1<<30
	for _, n := range names {
		if strings.EqualFold(n, key) {
			return n
		}
		if d := levenshtein.Distance(strings.ToLower(key), strings.ToLower(n), nil); d < bestD {
			best, bestD = n, d
		}
	}
	if bestD <= max(2, len(key)/3) {
		return best
	}
	return ""
}

// fieldNames lists the YAML names of t's fields, inlined structs' included, in declaration order.
func fieldNames(t reflect.Type) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if strings.Contains(","+opts+",", ",inline,") {
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				out = append(out, fieldNames(ft)...)
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		out = append(out, name)
	}
	return out
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
	// Line, when set, is where the problem is (else the line of Field in the document).
	Line int
}

func (p Problem) Error() string { return p.Field + ": " + p.Message }

// Problems collects validation failures.
type Problems []Problem

// Addf records a problem with field, e.g. p.Addf("services[1].host", "%q is not a DNS name", h).
func (p *Problems) Addf(field, format string, args ...any) {
	*p = append(*p, Problem{Field: field, Message: fmt.Sprintf(format, args...)})
}

func (p *Problems) add(field string, line int, format string, args ...any) {
	*p = append(*p, Problem{Field: field, Line: line, Message: fmt.Sprintf(format, args...)})
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

// In places the problems in doc: each becomes "file:line: field: message" (an Errors).
func (p Problems) In(doc *Doc) error {
	if len(p) == 0 {
		return nil
	}
	return p.errors(doc)
}

func (p Problems) errors(doc *Doc) Errors {
	var out Errors
	for _, pr := range p {
		e := &Error{File: doc.File, Line: pr.Line, Path: pr.Field, Message: pr.Message}
		if e.Line == 0 {
			e.Line = doc.Line(pr.Field)
		}
		out = append(out, e)
	}
	return out
}

// Error is one problem in a YAML file: where (file, line, field path) and what to do.
type Error struct {
	File    string `json:"file"`
	Line    int    `json:"line,omitempty"`
	Path    string `json:"path,omitempty"`
	Message string `json:"message"`
}

// Error is "file:line: path: message", leaving out what is unknown.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Path != "" {
		b.WriteString(e.Path + ": ")
	}
	b.WriteString(e.Message)
	return b.String()
}

// Errors are the problems of one file, one per line when printed, in document order.
type Errors []*Error

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.As find each *Error.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

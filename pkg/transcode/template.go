package transcode

import (
	"fmt"
	"net/url"
	"strings"
)

// Template is a parsed google.api.http path template (google/api/http.proto):
//
//	Template = "/" Segments [ Verb ] ;
//	Segments = Segment { "/" Segment } ;
//	Segment  = "*" | "**" | LITERAL | Variable ;
//	Variable = "{" FieldPath [ "=" Segments ] "}" ;
//	Verb     = ":" LITERAL ;
type Template struct {
	Segments []string // a literal, "*" (one segment) or "**" (the rest, zero or more)
	Vars     []Variable
	Verb     string
}

// Variable binds the segments [Start, End) to a request field; End is -1 when the variable
// ends in "**" and takes the rest of the path.
type Variable struct {
	Field      []string
	Start, End int
}

// ParseTemplate parses a path template.
func ParseTemplate(s string) (*Template, error) {
	if !strings.HasPrefix(s, "/") {
		return nil, fmt.Errorf("path template %q must start with /", s)
	}
	t := &Template{}
	rest := s[1:]
	// The verb is after the last ':' that is outside any {...}.
	depth, verbAt := 0, -1
	for i, c := range rest {
		switch c {
		case '{':
			depth++
		case '}':
			depth--
		case ':':
			if depth == 0 {
				verbAt = i
			}
		}
	}
	if verbAt >= 0 {
		t.Verb, rest = rest[verbAt+1:], rest[:verbAt]
		if t.Verb == "" || strings.ContainsAny(t.Verb, "/{}*") {
			return nil, fmt.Errorf("path template %q: bad verb %q", s, t.Verb)
		}
	}
	// Top-level segments: split on "/" outside {...}.
	var parts []string
	depth, from := 0, 0
	for i, c := range rest {
		switch c {
		case '{':
			depth++
		case '}':
			depth--
		case '/':
			if depth == 0 {
				parts = append(parts, rest[from:i])
				from = i + 1
			}
		}
	}
	parts = append(parts, rest[from:])
	for _, part := range parts {
		if !strings.HasPrefix(part, "{") {
			if strings.ContainsAny(part, "{}") {
				return nil, fmt.Errorf("path template %q: a variable must be a whole segment", s)
			}
			if err := t.addSegment(s, part); err != nil {
				return nil, err
			}
			continue
		}
		if !strings.HasSuffix(part, "}") || strings.Count(part, "{") != 1 {
			return nil, fmt.Errorf("path template %q: a variable must be a whole segment", s)
		}
		field, pattern, hasPattern := strings.Cut(part[1:len(part)-1], "=")
		if !hasPattern {
			pattern = "*"
		}
		v := Variable{Field: strings.Split(field, "."), Start: len(t.Segments)}
		for _, f := range v.Field {
			if !isIdent(f) {
				return nil, fmt.Errorf("path template %q: %q is not a field path", s, field)
			}
		}
		for _, seg := range strings.Split(pattern, "/") {
			if err := t.addSegment(s, seg); err != nil {
				return nil, err
			}
		}
		v.End = len(t.Segments)
		if t.Segments[len(t.Segments)-1] == "**" {
			v.End = -1
		}
		t.Vars = append(t.Vars, v)
	}
	for i, seg := range t.Segments {
		if seg == "**" && i != len(t.Segments)-1 {
			return nil, fmt.Errorf("path template %q: ** must be the last segment", s)
		}
	}
	return t, nil
}

func (t *Template) addSegment(tmpl, seg string) error {
	if seg == "" {
		return fmt.Errorf("path template %q: empty segment", tmpl)
	}
	t.Segments = append(t.Segments, seg)
	return nil
}

func isIdent(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// Key is the template with its variables' names erased, so that two templates that match the
// same paths have the same key: /v1/{name}/items and /v1/{id}/items are both /v1/*/items.
func (t *Template) Key() string {
	k := "/" + strings.Join(t.Segments, "/")
	if t.Verb != "" {
		k += ":" + t.Verb
	}
	return k
}

// Match matches the request path's segments (split on "/", still escaped) and verb, returning
// each variable's value, unescaped, or ok false.
func (t *Template) Match(segs []string, verb string) (vals []string, ok bool) {
	if verb != t.Verb {
		return nil, false
	}
	last := t.Segments[len(t.Segments)-1]
	switch {
	case last == "**":
		if len(segs) < len(t.Segments)-1 {
			return nil, false
		}
	case len(segs) != len(t.Segments):
		return nil, false
	}
	for i, seg := range t.Segments {
		if seg == "**" {
			break
		}
		if seg != "*" && seg != segs[i] {
			return nil, false
		}
	}
	vals = make([]string, len(t.Vars))
	for i, v := range t.Vars {
		end := v.End
		if end < 0 {
			end = len(segs)
		}
		raw := strings.Join(segs[v.Start:end], "/")
		u, err := url.PathUnescape(raw)
		if err != nil {
			return nil, false
		}
		vals[i] = u
	}
	return vals, true
}

// rank orders templates that match the same path as Envoy's path matcher does: a literal
// segment wins over a wildcard, "*" over "**", compared from the first segment on.
func rank(a, b *Template) int {
	w := func(s string) int {
		switch s {
		case "**":
			return 2
		case "*":
			return 1
		}
		return 0
	}
	for i := 0; i < len(a.Segments) && i < len(b.Segments); i++ {
		if d := w(a.Segments[i]) - w(b.Segments[i]); d != 0 {
			return d
		}
	}
	return len(b.Segments) - len(a.Segments)
}

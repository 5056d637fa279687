// Package transcode maps REST/JSON requests onto gRPC methods from a protobuf descriptor set and
// its google.api.http annotations, as Envoy's grpc_json_transcoder filter does: the catalog uses
// it to validate a service's transcoding, the built-in data plane to serve it. No Envoy types and
// no networking here.
package transcode

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"google.golang.org/genproto/googleapis/api/annotations"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// Binding is one HTTP rule of a method: an HTTP method and path template, and where the body goes.
type Binding struct {
	Method protoreflect.MethodDescriptor
	// HTTPMethod is GET, PUT, POST, DELETE, PATCH or a custom rule's kind.
	HTTPMethod string
	Pattern    string
	Template   *Template
	// Body is "" (no body), "*" (the whole request message) or the request field the body fills.
	Body string
	// ResponseBody is "" (the whole response message) or the response field sent as the body.
	ResponseBody string
	// GRPCPath is the method's gRPC path, /package.Service/Method.
	GRPCPath string
}

// ServiceError is a problem with one of the services to expose; Index is its position in the
// list given to New.
type ServiceError struct {
	Index int
	Err   error
}

func (e *ServiceError) Error() string { return e.Err.Error() }
func (e *ServiceError) Unwrap() error { return e.Err }

// Set is a descriptor set's exposed services with their bindings, ready to match requests.
type Set struct {
	Files    *protoregistry.Files
	Types    *dynamicpb.Types
	Bindings []*Binding
	// byMethod holds the bindings per HTTP method, most specific template first.
	byMethod map[string][]*Binding
}

// ParseFiles parses a serialized FileDescriptorSet (protoc --include_imports
// --descriptor_set_out, or buf build -o) into resolved files.
func ParseFiles(descriptorSet []byte) (*protoregistry.Files, error) {
	var fds descriptorpb.FileDescriptorSet
	// The google.api.http extension is linked in (annotations), so options decode with it.
	if err := proto.Unmarshal(descriptorSet, &fds); err != nil {
		return nil, fmt.Errorf("not a serialized FileDescriptorSet (%v); build one with protoc --include_imports --descriptor_set_out=FILE or buf build -o FILE", err)
	}
	if len(fds.File) == 0 {
		return nil, errors.New("the descriptor set holds no files; build it with protoc --include_imports --descriptor_set_out=FILE or buf build -o FILE")
	}
	files, err := protodesc.NewFiles(&fds)
	if err != nil {
		return nil, fmt.Errorf("the descriptor set does not resolve (%v); was it built with --include_imports?", err)
	}
	return files, nil
}

// New parses descriptorSet and collects the bindings of services (full names, e.g.
// shop.v1.Catalog). A method without a google.api.http rule is bound to POST
// /package.Service/Method with body "*" (Envoy's auto_mapping). Every problem is returned, joined:
// a set that does not parse, a service not in it (a *ServiceError), a rule that does not parse,
// and two methods on the same HTTP method and path.
func New(descriptorSet []byte, services []string) (*Set, error) {
	files, err := ParseFiles(descriptorSet)
	if err != nil {
		return nil, err
	}
	s := &Set{Files: files, Types: dynamicpb.NewTypes(files), byMethod: map[string][]*Binding{}}
	var errs []error
	type owner struct{ method, pattern string }
	seen := map[string]owner{}
	listed := map[string]bool{}
	for i, name := range services {
		if listed[name] {
			errs = append(errs, &ServiceError{i, fmt.Errorf("service %q is listed twice", name)})
			continue
		}
		listed[name] = true
		d, err := files.FindDescriptorByName(protoreflect.FullName(name))
		sd, ok := d.(protoreflect.ServiceDescriptor)
		if err != nil || !ok {
			errs = append(errs, &ServiceError{i, fmt.Errorf("service %q is not in the descriptor set (it has %s); write the full name, package included", name, serviceNames(files))})
			continue
		}
		for j := 0; j < sd.Methods().Len(); j++ {
			md := sd.Methods().Get(j)
			bs, err := methodBindings(md)
			if err != nil {
				errs = append(errs, &ServiceError{i, err})
				continue
			}
			for _, b := range bs {
				key := b.HTTPMethod + " " + b.Template.Key()
				if prev, dup := seen[key]; dup {
					errs = append(errs, &ServiceError{i, fmt.Errorf("%s and %s are both bound to %s %s (as %q and %q); give one of them another path or verb in its google.api.http rule",
						prev.method, md.FullName(), b.HTTPMethod, b.Template.Key(), prev.pattern, b.Pattern)})
					continue
				}
				seen[key] = owner{string(md.FullName()), b.Pattern}
				s.Bindings = append(s.Bindings, b)
				s.byMethod[b.HTTPMethod] = append(s.byMethod[b.HTTPMethod], b)
			}
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	for _, bs := range s.byMethod {
		slices.SortStableFunc(bs, func(a, b *Binding) int { return rank(a.Template, b.Template) })
	}
	return s, nil
}

func serviceNames(files *protoregistry.Files) string {
	var names []string
	files.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		for i := 0; i < fd.Services().Len(); i++ {
			names = append(names, string(fd.Services().Get(i).FullName()))
		}
		return true
	})
	if len(names) == 0 {
		return "no services"
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

func methodBindings(md protoreflect.MethodDescriptor) ([]*Binding, error) {
	grpcPath := "/" + string(md.Parent().FullName()) + "/" + string(md.Name())
	rule, _ := proto.GetExtension(md.Options(), annotations.E_Http).(*annotations.HttpRule)
	if rule == nil || rule.GetPattern() == nil {
		t, _ := ParseTemplate(grpcPath)
		return []*Binding{{Method: md, HTTPMethod: http.MethodPost, Pattern: grpcPath, Template: t, Body: "*", GRPCPath: grpcPath}}, nil
	}
	var out []*Binding
	rules := append([]*annotations.HttpRule{rule}, rule.GetAdditionalBindings()...)
	for _, r := range rules {
		b, err := binding(md, r)
		if err != nil {
			return nil, fmt.Errorf("method %s: %w", md.FullName(), err)
		}
		b.GRPCPath = grpcPath
		out = append(out, b)
	}
	return out, nil
}

func binding(md protoreflect.MethodDescriptor, r *annotations.HttpRule) (*Binding, error) {
	b := &Binding{Method: md, Body: r.GetBody(), ResponseBody: r.GetResponseBody()}
	switch p := r.GetPattern().(type) {
	case *annotations.HttpRule_Get:
		b.HTTPMethod, b.Pattern = http.MethodGet, p.Get
	case *annotations.HttpRule_Put:
		b.HTTPMethod, b.Pattern = http.MethodPut, p.Put
	case *annotations.HttpRule_Post:
		b.HTTPMethod, b.Pattern = http.MethodPost, p.Post
	case *annotations.HttpRule_Delete:
		b.HTTPMethod, b.Pattern = http.MethodDelete, p.Delete
	case *annotations.HttpRule_Patch:
		b.HTTPMethod, b.Pattern = http.MethodPatch, p.Patch
	case *annotations.HttpRule_Custom:
		b.HTTPMethod, b.Pattern = p.Custom.GetKind(), p.Custom.GetPath()
	default:
		return nil, errors.New("google.api.http rule without a pattern")
	}
	if b.HTTPMethod == "" {
		return nil, errors.New("custom google.api.http rule without a kind")
	}
	t, err := ParseTemplate(b.Pattern)
	if err != nil {
		return nil, err
	}
	b.Template = t
	in := md.Input()
	for _, v := range t.Vars {
		if _, err := fieldPath(in, v.Field); err != nil {
			return nil, fmt.Errorf("path %q: %w", b.Pattern, err)
		}
	}
	if b.Body != "" && b.Body != "*" {
		fds, err := fieldPath(in, strings.Split(b.Body, "."))
		if err != nil {
			return nil, fmt.Errorf("body %q: %w", b.Body, err)
		}
		if len(fds) != 1 {
			return nil, fmt.Errorf("body %q must be a top-level field of %s", b.Body, in.FullName())
		}
	}
	if b.ResponseBody != "" {
		fds, err := fieldPath(md.Output(), strings.Split(b.ResponseBody, "."))
		if err != nil || len(fds) != 1 {
			return nil, fmt.Errorf("response_body %q must be a top-level field of %s", b.ResponseBody, md.Output().FullName())
		}
	}
	return b, nil
}

// fieldPath resolves a dotted field path (proto or JSON names) from message md; every field but
// the last must be a singular message.
func fieldPath(md protoreflect.MessageDescriptor, path []string) ([]protoreflect.FieldDescriptor, error) {
	var out []protoreflect.FieldDescriptor
	for i, name := range path {
		fd := md.Fields().ByName(protoreflect.Name(name))
		if fd == nil {
			fd = md.Fields().ByJSONName(name)
		}
		if fd == nil {
			return nil, fmt.Errorf("no field %q in %s", strings.Join(path[:i+1], "."), md.FullName())
		}
		out = append(out, fd)
		if i < len(path)-1 {
			if fd.Message() == nil || fd.IsList() || fd.IsMap() {
				return nil, fmt.Errorf("field %q of %s is not a message", name, md.FullName())
			}
			md = fd.Message()
		}
	}
	return out, nil
}

// Match finds the binding for an HTTP method and escaped path (no query), with the values of
// its path variables; nil when none matches (Envoy then passes the request on untouched).
func (s *Set) Match(method, path string) (*Binding, []string) {
	bs := s.byMethod[method]
	if len(bs) == 0 || !strings.HasPrefix(path, "/") {
		return nil, nil
	}
	segs := strings.Split(path[1:], "/")
	last := segs[len(segs)-1]
	if i := strings.LastIndexByte(last, ':'); i >= 0 {
		withVerb := slices.Clone(segs)
		withVerb[len(withVerb)-1] = last[:i]
		for _, b := range bs {
			if vals, ok := b.Template.Match(withVerb, last[i+1:]); ok {
				return b, vals
			}
		}
	}
	for _, b := range bs {
		if vals, ok := b.Template.Match(segs, ""); ok {
			return b, vals
		}
	}
	return nil, nil
}

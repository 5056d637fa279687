package catalog

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/fwdproxy/fwdproxy/internal/strictyaml"
	"github.com/fwdproxy/fwdproxy/pkg/transcode"
)

// Transcoding serves a grpc service's methods to REST/JSON clients: the fleet translates each
// HTTP/JSON request into a gRPC call toward the mesh and the answer back into JSON, following
// the methods' google.api.http annotations.
type Transcoding struct {
	// DescriptorSet is the file of a serialized FileDescriptorSet with its imports (protoc
	// --include_imports --descriptor_set_out=FILE, or buf build -o FILE); a relative path is from
	// the catalog file's directory.
	DescriptorSet string `yaml:"descriptorSet" json:"descriptorSet"`
	// Services are the full names of the gRPC services to expose, e.g. shop.v1.Catalog.
	Services []string `yaml:"services" json:"services"`
	// Print shapes the JSON answers.
	Print PrintOptions `yaml:"print,omitempty" json:"print,omitempty"`
	// Descriptor is the descriptor set's content: read from DescriptorSet when the catalog is
	// loaded, and carried with the service (gossip included) so every data plane gets the same.
	Descriptor []byte `yaml:"-" json:"descriptor,omitempty"`
	// readFailed: loading could not read DescriptorSet (and said so).
	readFailed bool
}

// PrintOptions are how responses are printed as JSON.
type PrintOptions struct {
	// ProtoFieldNames prints fields by their proto names (display_name) instead of the JSON
	// names (displayName).
	ProtoFieldNames bool `yaml:"protoFieldNames,omitempty" json:"protoFieldNames,omitempty"`
	// EmitDefaults prints scalar, repeated and map fields that hold their default value.
	EmitDefaults bool `yaml:"emitDefaults,omitempty" json:"emitDefaults,omitempty"`
	// EnumsAsInts prints enum values as numbers instead of names.
	EnumsAsInts bool `yaml:"enumsAsInts,omitempty" json:"enumsAsInts,omitempty"`
}

// MaxDescriptorSetBytes bounds a descriptor set: it goes inline into every data plane's
// configuration, once per virtual host.
const MaxDescriptorSetBytes = 4 << 20

// loadDescriptors reads the descriptor set file of every service with transcoding; a file that
// cannot be read is a problem of that field.
func (c *Catalog) loadDescriptors(catalogFile string, p *strictyaml.Problems) {
	for i := range c.Services {
		t := c.Services[i].Transcoding
		if t == nil || t.DescriptorSet == "" || t.Descriptor != nil {
			continue
		}
		path := t.DescriptorSet
		if !filepath.IsAbs(path) {
			path = filepath.Join(filepath.Dir(catalogFile), path)
		}
		data, err := readLimited(path, MaxDescriptorSetBytes)
		if err != nil {
			p.Addf(fmt.Sprintf("services[%d].transcoding.descriptorSet", i), "%v; build it with protoc --include_imports --descriptor_set_out=FILE or buf build -o FILE", err)
			t.readFailed = true
			continue
		}
		t.Descriptor = data
	}
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return data, nil
}

// transcodingProblems checks a service's transcoding: a grpc port, a descriptor set that parses,
// the services in it, and no two methods on the same HTTP method and path.
func transcodingProblems(f string, s *Service, p *strictyaml.Problems) {
	t := s.Transcoding
	if t == nil {
		return
	}
	f += ".transcoding"
	if !slices.ContainsFunc(s.Ports, func(port Port) bool { return Protocol(strings.ToLower(string(port.Protocol))) == GRPC }) {
		p.Addf(f, "transcoding translates REST/JSON to gRPC and needs a grpc port")
	}
	if len(t.Services) == 0 {
		p.Addf(f+".services", "at least one gRPC service to expose is required, by full name, e.g. shop.v1.Catalog")
	}
	switch {
	case t.DescriptorSet == "" && t.Descriptor == nil:
		p.Addf(f+".descriptorSet", "required: the descriptor set file (protoc --include_imports --descriptor_set_out=FILE, or buf build -o FILE)")
		return
	case t.readFailed:
		return // already reported
	case t.Descriptor == nil:
		p.Addf(f+".descriptorSet", "%s was not read: descriptor sets are read from catalog files (discovery.files) on the instance, not sent with fwdproxy apply", t.DescriptorSet)
		return
	case len(t.Descriptor) > MaxDescriptorSetBytes:
		p.Addf(f+".descriptorSet", "the descriptor set is larger than %d bytes", MaxDescriptorSetBytes)
		return
	}
	if len(t.Services) == 0 {
		return
	}
	_, err := transcode.New(t.Descriptor, t.Services)
	if err == nil {
		return
	}
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	for _, e := range errs {
		var se *transcode.ServiceError
		if errors.As(e, &se) {
			p.Addf(fmt.Sprintf("%s.services[%d]", f, se.Index), "%v", se.Err)
		} else {
			p.Addf(f+".descriptorSet", "%s: %v", t.DescriptorSet, e)
		}
	}
}

// Set returns the parsed descriptor set with its bindings (validated: it does not fail for a
// service that passed the catalog's rules).
func (t *Transcoding) Set() (*transcode.Set, error) { return transcode.New(t.Descriptor, t.Services) }

func (t *Transcoding) clone() *Transcoding {
	if t == nil {
		return nil
	}
	c := *t
	c.Services = slices.Clone(t.Services)
	// The descriptor's bytes are never changed in place; copies share them.
	return &c
}

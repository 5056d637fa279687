// Package catalog is the normalized list of mesh services the fleet forwards to. Every source
// (static files, Kubernetes, operators' entries replicated by gossip) produces a Catalog; the
// control plane translates one merged Catalog into Envoy configuration. No Envoy types here.
package catalog

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/fwdproxy/fwdproxy/internal/strictyaml"
)

// Protocol is how a service port speaks, following Istio's protocol names.
type Protocol string

const (
	HTTP  Protocol = "http"
	HTTP2 Protocol = "http2"
	GRPC  Protocol = "grpc"
	TCP   Protocol = "tcp"
)

// IsHTTP reports whether the port is routed by Host on an HTTP listener.
func (p Protocol) IsHTTP() bool { return p == HTTP || p == HTTP2 || p == GRPC }

// UsesHTTP2Upstream reports whether the upstream speaks HTTP/2 (prior knowledge over mTLS).
func (p Protocol) UsesHTTP2Upstream() bool { return p == HTTP2 || p == GRPC }

// Catalog is a set of services, sorted by host once normalized.
type Catalog struct {
	Services []Service `yaml:"services" json:"services"`
	// Checked is set by discovery.Merge on a catalog whose services all passed Problems
	// together, so that translation need not check all 10,000 of them again for a one-service
	// change. Code that changes Services afterwards must clear it; a catalog file, gossip or
	// JSON cannot set it.
	Checked bool `yaml:"-" json:"-"`
}

// Service is one mesh service reachable through the east-west gateway.
type Service struct {
	// Host is the service's FQDN in the mesh, e.g. reviews.default.svc.cluster.local.
	Host string `yaml:"host" json:"host"`
	// Aliases are extra Host names (for HTTP ports) that legacy clients may use.
	Aliases []string `yaml:"aliases,omitempty" json:"aliases,omitempty"`
	Ports   []Port   `yaml:"ports" json:"ports"`
	// Identities are the SPIFFE IDs allowed to serve this service; the upstream certificate's URI
	// SAN must equal one of them.
	Identities []string `yaml:"identities" json:"identities"`
	// Subsets are named versions (Istio DestinationRule subsets) reached by their own Host names.
	Subsets []Subset `yaml:"subsets,omitempty" json:"subsets,omitempty"`
	// AllowedClients restricts which client addresses may use this service; empty allows all.
	AllowedClients []string `yaml:"allowedClients,omitempty" json:"allowedClients,omitempty"`
	// Gateways names the east-west gateways that reach the service; empty means all of them.
	Gateways []string `yaml:"gateways,omitempty" json:"gateways,omitempty"`
	// Transcoding serves the service's gRPC methods to REST/JSON clients (transcoding.go).
	Transcoding *Transcoding `yaml:"transcoding,omitempty" json:"transcoding,omitempty"`
}

// Port is one service port.
type Port struct {
	Number   uint32   `yaml:"number" json:"number"`
	Protocol Protocol `yaml:"protocol" json:"protocol"`
	Name     string   `yaml:"name,omitempty" json:"name,omitempty"`
}

// Subset is a named subset of a service's workloads, selected by Host on HTTP ports.
type Subset struct {
	Name  string   `yaml:"name" json:"name"`
	Hosts []string `yaml:"hosts" json:"hosts"`
}

// Options carries what validation needs to know beyond the catalog itself.
type Options struct {
	// Gateways are the names of the configured east-west gateways; nil skips the check.
	Gateways []string
	// Reserved are the ports the daemon itself listens on where the service listeners would
	// collide with them (config.Config.ReservedPorts); nil skips the check.
	Reserved []ReservedPort
}

// ReservedPort is a port the daemon listens on itself: Field is the config field that sets it
// (metrics.address), Address its value.
type ReservedPort struct {
	Port    uint32
	Field   string
	Address string
}

// Load reads, parses, normalizes and validates a catalog file.
func Load(path string, opts Options) (*Catalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read catalog: %w", err)
	}
	return parse(path, data, opts, true)
}

// Parse parses a catalog document; errors name the file, line and field.
//
// Empty means empty on purpose: a file with no document (blank, only comments, a lone "---"),
// without a services key, or with a null one ("services:" and nothing after it) is an error, not
// an empty catalog, since a file caught half-written or truncated by mistake must not withdraw
// every service. To serve none, write "services: []". A second YAML document is an error too.
//
// Parse reads no other file: a transcoding descriptor set is read by Load only, from a catalog
// file on disk, so a document sent over the admin API cannot make the daemon open a path.
func Parse(file string, data []byte, opts Options) (*Catalog, error) {
	return parse(file, data, opts, false)
}

func parse(file string, data []byte, opts Options, readFiles bool) (*Catalog, error) {
	var c Catalog
	doc, err := strictyaml.Decode(file, data, &c)
	if errors.Is(err, strictyaml.ErrEmpty) {
		return nil, fmt.Errorf("%s: the catalog is empty (no YAML document: the file is blank, only comments or null); list the services, or to serve none deliberately write \"services: []\"", file)
	}
	if doc == nil {
		return nil, err
	}
	switch present, null, line := doc.Field("services"); {
	case !present:
		return nil, fmt.Errorf("%s:%d: no services key; a catalog is services: [{host, ports, identities}, ...], or to serve none deliberately write \"services: []\"", file, doc.Line(""))
	case null:
		return nil, fmt.Errorf("%s:%d: services is null (nothing after \"services:\"); list the services, or to serve none deliberately write \"services: []\"", file, line)
	}
	var p strictyaml.Problems
	if readFiles {
		c.loadDescriptors(file, &p)
	}
	// Validate before normalizing so field paths match the file's own order.
	if err := doc.Check(err, append(p, c.Problems(opts)...)); err != nil {
		return nil, err
	}
	c.Normalize()
	return &c, nil
}

// Normalize lower-cases names, removes trailing dots and sorts everything, so that equal catalogs
// are equal values and translate to identical configuration on every peer.
func (c *Catalog) Normalize() {
	for i := range c.Services {
		s := &c.Services[i]
		s.Host = normHost(s.Host)
		for j := range s.Aliases {
			s.Aliases[j] = normHost(s.Aliases[j])
		}
		slices.Sort(s.Aliases)
		slices.SortFunc(s.Ports, func(a, b Port) int { return int(a.Number) - int(b.Number) })
		for j := range s.Ports {
			s.Ports[j].Protocol = Protocol(strings.ToLower(string(s.Ports[j].Protocol)))
		}
		slices.Sort(s.Identities)
		s.Identities = slices.Compact(s.Identities)
		for j := range s.Subsets {
			for k := range s.Subsets[j].Hosts {
				s.Subsets[j].Hosts[k] = normHost(s.Subsets[j].Hosts[k])
			}
			slices.Sort(s.Subsets[j].Hosts)
		}
		slices.SortFunc(s.Subsets, func(a, b Subset) int { return strings.Compare(a.Name, b.Name) })
		for j, cidr := range s.AllowedClients {
			if p, err := netip.ParsePrefix(cidr); err == nil {
				s.AllowedClients[j] = p.Masked().String()
			}
		}
		slices.Sort(s.AllowedClients)
		s.AllowedClients = slices.Compact(s.AllowedClients)
		slices.Sort(s.Gateways)
		s.Gateways = slices.Compact(s.Gateways)
		if s.Transcoding != nil {
			slices.Sort(s.Transcoding.Services)
			s.Transcoding.Services = slices.Compact(s.Transcoding.Services)
		}
	}
	slices.SortFunc(c.Services, func(a, b Service) int { return strings.Compare(a.Host, b.Host) })
}

func normHost(h string) string { return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(h)), ".") }

// Validate returns every problem in the catalog as one error (nil when valid).
func (c *Catalog) Validate(opts Options) error { return c.Problems(opts).Err() }

// Problems lists every problem in the catalog with its field path. Hosts must be unique across
// services (aliases and subset hosts included), and a TCP port belongs to exactly one service and
// cannot also be an HTTP port, since the listener on that port can route only one way.
func (c *Catalog) Problems(opts Options) strictyaml.Problems {
	var p strictyaml.Problems
	hostOwner := make(map[string]string, len(c.Services)) // host name -> field that claimed it
	type portUse struct {
		field, host string
		proto       Protocol
	}
	portOwner := make(map[uint32]portUse, len(c.Services))
	claim := func(field, name string) {
		n := normHost(name)
		if prev, ok := hostOwner[n]; ok {
			p.Addf(field, "host %q is already used by %s; each host name may appear once in the catalog", n, prev)
			return
		}
		hostOwner[n] = field
	}
	for i, s := range c.Services {
		f := "services[" + strconv.Itoa(i) + "]"
		if s.Host == "" {
			p.Addf(f+".host", "required: the service's FQDN, e.g. reviews.default.svc.cluster.local")
		} else if err := checkHost(s.Host); err != nil {
			p.Addf(f+".host", "%v", err)
		} else {
			claim(f+".host", s.Host)
		}
		for j, a := range s.Aliases {
			af := fmt.Sprintf("%s.aliases[%d]", f, j)
			if err := checkHost(a); err != nil {
				p.Addf(af, "%v", err)
			} else {
				claim(af, a)
			}
		}
		if len(s.Ports) == 0 {
			p.Addf(f+".ports", "at least one port is required, e.g. {number: 9080, protocol: http}")
		}
		seen := map[uint32]bool{}
		hasHTTP := false
		for j, port := range s.Ports {
			pf := f + ".ports[" + strconv.Itoa(j) + "]"
			if port.Number < 1 || port.Number > 65535 {
				p.Addf(pf+".number", "%d is not a valid port; use 1-65535", port.Number)
				continue
			}
			if seen[port.Number] {
				p.Addf(pf+".number", "port %d is listed twice for %s", port.Number, s.Host)
				continue
			}
			seen[port.Number] = true
			if i := slices.IndexFunc(opts.Reserved, func(r ReservedPort) bool { return r.Port == port.Number }); i >= 0 {
				r := opts.Reserved[i]
				p.Addf(pf+".number", "port %d is the daemon's own %s (%s), which the service's listener would collide with; give the service another port or move %s", port.Number, r.Field, r.Address, r.Field)
				continue
			}
			proto := Protocol(strings.ToLower(string(port.Protocol)))
			switch proto {
			case HTTP, HTTP2, GRPC, TCP:
			case "":
				p.Addf(pf+".protocol", "required: one of http, http2, grpc, tcp")
				continue
			default:
				p.Addf(pf+".protocol", "%q is not supported; use one of http, http2, grpc, tcp", port.Protocol)
				continue
			}
			hasHTTP = hasHTTP || proto.IsHTTP()
			if prev, ok := portOwner[port.Number]; ok {
				switch {
				case proto == TCP || prev.proto == TCP:
					p.Addf(pf+".number", "port %d (%s) collides with %s (%s, %s): a TCP port can serve only one service and cannot share a port with HTTP; give one of them another port",
						port.Number, proto, prev.host, prev.proto, prev.field)
				}
				continue
			}
			portOwner[port.Number] = portUse{field: pf, host: s.Host, proto: proto}
		}
		if len(s.Aliases) > 0 && !hasHTTP {
			p.Addf(f+".aliases", "aliases select a service by Host and need an http, http2 or grpc port")
		}
		if len(s.Identities) == 0 {
			p.Addf(f+".identities", "at least one SPIFFE ID is required (the identity the service's workloads present), e.g. spiffe://cluster.local/ns/default/sa/reviews")
		}
		for j, id := range s.Identities {
			if err := CheckSPIFFEID(id); err != nil {
				p.Addf(fmt.Sprintf("%s.identities[%d]", f, j), "%v", err)
			}
		}
		subsetNames := map[string]bool{}
		for j, sub := range s.Subsets {
			sf := fmt.Sprintf("%s.subsets[%d]", f, j)
			if errs := validation.IsDNS1123Label(sub.Name); len(errs) > 0 {
				p.Addf(sf+".name", "%q is not a valid subset name (%s)", sub.Name, strings.Join(errs, "; "))
			} else if subsetNames[sub.Name] {
				p.Addf(sf+".name", "subset %q is listed twice", sub.Name)
			}
			subsetNames[sub.Name] = true
			if len(sub.Hosts) == 0 {
				p.Addf(sf+".hosts", "at least one Host name is required to select subset %q", sub.Name)
			}
			if !hasHTTP {
				p.Addf(sf, "subsets are selected by Host and need an http, http2 or grpc port")
			}
			for k, h := range sub.Hosts {
				hf := fmt.Sprintf("%s.hosts[%d]", sf, k)
				if err := checkHost(h); err != nil {
					p.Addf(hf, "%v", err)
				} else {
					claim(hf, h)
				}
			}
		}
		for j, cidr := range s.AllowedClients {
			cf := fmt.Sprintf("%s.allowedClients[%d]", f, j)
			pfx, err := netip.ParsePrefix(cidr)
			switch {
			case err != nil:
				hint := ""
				if a, err2 := netip.ParseAddr(cidr); err2 == nil {
					hint = fmt.Sprintf("; for one address write %s/%d", cidr, a.BitLen())
				}
				p.Addf(cf, "%q is not a CIDR such as 10.0.0.0/8%s", cidr, hint)
			case pfx != pfx.Masked():
				// 10.0.0.5/8 is most likely a typo for a network or for one address; guessing
				// either would allow clients the operator did not mean to (or refuse ones they did).
				p.Addf(cf, "%q has host bits set; did you mean %s? (for the one address write %s/%d)", cidr, pfx.Masked(), pfx.Addr(), pfx.Addr().BitLen())
			}
		}
		transcodingProblems(f, &s, &p)
		for j, g := range s.Gateways {
			if opts.Gateways != nil && !slices.Contains(opts.Gateways, g) {
				p.Addf(fmt.Sprintf("%s.gateways[%d]", f, j), "unknown gateway %q; configured gateways: %s", g, strings.Join(opts.Gateways, ", "))
			}
		}
	}
	return p
}

func checkHost(h string) error {
	n := normHost(h)
	if !isDNS1123Subdomain(n) {
		if errs := validation.IsDNS1123Subdomain(n); len(errs) > 0 {
			return fmt.Errorf("%q is not a valid DNS name: %s", h, strings.Join(errs, "; "))
		}
	}
	if !strings.Contains(n, ".") {
		return fmt.Errorf("%q is not fully qualified; write the FQDN, e.g. %s.default.svc.cluster.local", h, n)
	}
	// DNS1123 subdomains bound the name, not its labels; a longer label never resolves, and
	// Istio refuses it in a ServiceEntry host.
	for label := range strings.SplitSeq(n, ".") {
		if len(label) > 63 {
			return fmt.Errorf("%q is not a valid DNS name: its label %q is %d characters, and a DNS label is at most 63 (RFC 1035)", h, label, len(label))
		}
	}
	return nil
}

// isDNS1123Subdomain is validation.IsDNS1123Subdomain's language: at most 253 characters, labels
// of lower-case letters, digits and '-' that start and end with a letter or digit.
func isDNS1123Subdomain(n string) bool {
	if len(n) == 0 || len(n) > 253 {
		return false
	}
	for label := range strings.SplitSeq(n, ".") {
		if label == "" || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// CheckSPIFFEID returns an error explaining why id is not a SPIFFE ID usable as a workload identity.
func CheckSPIFFEID(id string) error {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return fmt.Errorf("%q is not a valid SPIFFE ID (%v); use spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>", id, err)
	}
	if sid.Path() == "" {
		return fmt.Errorf("%q names only a trust domain; a workload identity needs a path such as /ns/default/sa/reviews", id)
	}
	return nil
}

// Clone returns a deep copy, so that normalizing or editing it never touches the original.
func (s Service) Clone() Service {
	s.Aliases = slices.Clone(s.Aliases)
	s.Ports = slices.Clone(s.Ports)
	s.Identities = slices.Clone(s.Identities)
	s.AllowedClients = slices.Clone(s.AllowedClients)
	s.Gateways = slices.Clone(s.Gateways)
	s.Transcoding = s.Transcoding.clone()
	subsets := make([]Subset, len(s.Subsets))
	for i, sub := range s.Subsets {
		subsets[i] = Subset{Name: sub.Name, Hosts: slices.Clone(sub.Hosts)}
	}
	if s.Subsets != nil {
		s.Subsets = subsets
	}
	return s
}

// Equal reports whether s and o are the same service: reflect.DeepEqual's answer, at a fraction
// of its cost, since translation compares each of 10,000 services with its last translation on
// every change. A field added to Service must be compared here (TestServiceEqualIsDeepEqual).
func (s *Service) Equal(o *Service) bool {
	return s.Host == o.Host && sameStrings(s.Aliases, o.Aliases) &&
		(s.Ports == nil) == (o.Ports == nil) && slices.Equal(s.Ports, o.Ports) &&
		sameStrings(s.Identities, o.Identities) &&
		(s.Subsets == nil) == (o.Subsets == nil) && slices.EqualFunc(s.Subsets, o.Subsets, func(a, b Subset) bool {
		return a.Name == b.Name && sameStrings(a.Hosts, b.Hosts)
	}) &&
		sameStrings(s.AllowedClients, o.AllowedClients) && sameStrings(s.Gateways, o.Gateways) &&
		(s.Transcoding == o.Transcoding || s.Transcoding != nil && o.Transcoding != nil && reflect.DeepEqual(s.Transcoding, o.Transcoding))
}

// sameStrings is reflect.DeepEqual on two string slices: nil and empty differ.
func sameStrings(a, b []string) bool { return (a == nil) == (b == nil) && slices.Equal(a, b) }

// Lookup returns the service with host (after normalization), or nil.
func (c *Catalog) Lookup(host string) *Service {
	h := normHost(host)
	for i := range c.Services {
		if c.Services[i].Host == h {
			return &c.Services[i]
		}
	}
	return nil
}

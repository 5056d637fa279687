// Package config is the daemon's configuration file: strict parsing, defaults and validation with
// errors that name the file, line and field.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/fwdproxy/fwdproxy/internal/strictyaml"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Config is the whole daemon configuration. Relative paths are relative to the config file.
type Config struct {
	Node      Node      `yaml:"node"`
	Mesh      Mesh      `yaml:"mesh"`
	Gateways  []Gateway `yaml:"gateways"`
	Identity  Identity  `yaml:"identity"`
	Discovery Discovery `yaml:"discovery"`
	Listen    Listen    `yaml:"listen"`
	XDS       XDS       `yaml:"xds"`
	Metrics   Server    `yaml:"metrics"`
	Admin     Admin     `yaml:"admin"`
	Peers     Peers     `yaml:"peers"`
	Upstream  Upstream  `yaml:"upstream"`
	// Dataplane selects what moves the bytes: "builtin" (the daemon's own data plane), "envoy"
	// (the daemon supervises an Envoy process) or "none" (the daemon only serves xDS; data planes
	// run elsewhere). Default: envoy when envoy.binary is set, else builtin.
	Dataplane string `yaml:"dataplane"`
	Envoy     Envoy  `yaml:"envoy"`
	// Builtin tunes the built-in data plane (see dataplane.go).
	Builtin Builtin `yaml:"builtin"`
	// Reverse lists services on legacy VMs that mesh workloads call through the fleet (see
	// reverse.go).
	Reverse Reverse `yaml:"reverse"`

	// Dir is the directory of the config file, for resolving relative paths.
	Dir string `yaml:"-"`
	// doc is the parsed file, for the lines of fields.
	doc *strictyaml.Doc
}

// Node names this instance.
type Node struct {
	// ID is unique per instance; default: the host name.
	ID string `yaml:"id"`
	// Cluster is the Envoy node cluster, the same on every instance; default "fwdproxy".
	Cluster string `yaml:"cluster"`
}

// Mesh describes the Istio mesh the fleet forwards into.
type Mesh struct {
	// TrustDomain of the mesh's SPIFFE IDs; default "cluster.local".
	TrustDomain string `yaml:"trustDomain"`
	// PeerMetadata names the fleet as a workload to Istio's telemetry (see peermetadata.go).
	PeerMetadata PeerMetadata `yaml:"peerMetadata"`
}

// Gateway is one east-west gateway in AUTO_PASSTHROUGH mode.
type Gateway struct {
	Name string `yaml:"name"`
	// Address is an IP address or a DNS name (re-resolved periodically).
	Address string `yaml:"address"`
	// Port is the gateway's TLS passthrough port; default 15443.
	Port    uint32 `yaml:"port"`
	Network string `yaml:"network"`
	// Priority orders gateways for failover: services reached through several gateways use
	// those of the lowest priority (0, default: the local cluster's) and fail over to the next
	// when their endpoints are ejected by outlier detection.
	Priority uint32 `yaml:"priority"`
}

// Identity is the fleet's one workload identity.
type Identity struct {
	// SPIFFEID the fleet presents, e.g. spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy.
	SPIFFEID string         `yaml:"spiffeID"`
	Files    *IdentityFiles `yaml:"files"`
	// ACMPCA issues the identity from AWS Private CA (see acmpca.go); exactly one source is set.
	ACMPCA *ACMPCAIdentity `yaml:"acmpca"`
}

// IdentityFiles holds PEM files, reloaded when they change.
type IdentityFiles struct {
	// CertChain is the leaf followed by its intermediate(s).
	CertChain string `yaml:"certChain"`
	// PrivateKey is the leaf's key (PKCS#8, PKCS#1 or EC); keep it 0600.
	PrivateKey string `yaml:"privateKey"`
	// Roots is the mesh's root CA bundle, used to verify the services' certificates.
	Roots string `yaml:"roots"`
}

// Discovery lists the sources of mesh services.
type Discovery struct {
	// Files are static catalog files, reloaded on change.
	Files []string `yaml:"files"`
	// Kubernetes clusters to discover services in (see kubernetes.go).
	Kubernetes []KubernetesCluster `yaml:"kubernetes"`
}

// Listen describes the plain listeners legacy VMs connect to.
type Listen struct {
	// Address the service ports bind on; default "0.0.0.0".
	Address string `yaml:"address"`
	// AccessLog enables access logs on stdout; default true.
	AccessLog *bool `yaml:"accessLog"`
	// MaxRequestHeadersKB bounds a request's head (request line and header lines); larger
	// requests are answered 431. Default 60, Envoy's.
	MaxRequestHeadersKB uint32 `yaml:"maxRequestHeadersKB"`
	// MaxHeadersCount bounds the number of request headers; more are answered 431. Default
	// 100, Envoy's.
	MaxHeadersCount uint32 `yaml:"maxHeadersCount"`
	// MaxConnections is how many connections each service port holds at once; more are closed
	// at once. Default 10000.
	MaxConnections uint64 `yaml:"maxConnections"`
}

// Server is an address the daemon serves on.
type Server struct {
	Address string `yaml:"address"`
}

// Upstream tunes the clusters toward the gateways.
type Upstream struct {
	// ConnectTimeout for a TCP+TLS connection to a gateway; default 5s.
	ConnectTimeout time.Duration `yaml:"connectTimeout"`
	Outlier        Outlier       `yaml:"outlierDetection"`
}

// Outlier is the passive health checking of gateway endpoints.
type Outlier struct {
	// ConsecutiveErrors ejects an endpoint after this many consecutive failures; default 5.
	ConsecutiveErrors uint32 `yaml:"consecutiveErrors"`
	// Interval between ejection sweeps; default 10s.
	Interval time.Duration `yaml:"interval"`
	// BaseEjectionTime, multiplied by the number of ejections; default 30s.
	BaseEjectionTime time.Duration `yaml:"baseEjectionTime"`
	// MaxEjectionPercent of a cluster's endpoints that may be ejected at once; default 50.
	MaxEjectionPercent uint32 `yaml:"maxEjectionPercent"`
}

// Load reads, defaults and validates a config file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Parse parses a config document named file.
func Parse(file string, data []byte) (*Config, error) {
	c, err := Check(file, data)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Check parses like Parse, but returns the config together with its problems (as
// strictyaml.Errors), so that a caller such as fwdproxy validate can go on to check what the
// config points at (catalog files, identity) in the same run. The config is nil only when the
// file could not be parsed at all; with problems it holds what did fit, defaulted.
func Check(file string, data []byte) (*Config, error) {
	var c Config
	doc, err := strictyaml.Decode(file, data, &c)
	if errors.Is(err, strictyaml.ErrEmpty) {
		return nil, fmt.Errorf("%s: the config file is empty (no YAML document: the file is blank, only comments or null); it needs at least gateways and identity, see examples/config.yaml", file)
	}
	if doc == nil {
		return nil, err
	}
	c.Dir = filepath.Dir(file)
	c.doc = doc
	c.applyDefaults()
	// Every problem at once: what does not fit the fields, then what validation refuses.
	return &c, doc.Check(err, c.Problems())
}

// Line is the line of a field path (e.g. "identity.files.privateKey") in the config file, or of
// its closest ancestor there; 0 for a config that was not read from a file.
func (c *Config) Line(path string) int { return c.doc.Line(path) }

// File is the config file's name as it was read.
func (c *Config) File() string {
	if c.doc == nil {
		return ""
	}
	return c.doc.File
}

func (c *Config) applyDefaults() {
	if c.Node.ID == "" {
		c.Node.ID, _ = os.Hostname()
	}
	if c.Node.Cluster == "" {
		c.Node.Cluster = "fwdproxy"
	}
	if c.Mesh.TrustDomain == "" {
		c.Mesh.TrustDomain = "cluster.local"
	}
	for i := range c.Gateways {
		if c.Gateways[i].Port == 0 {
			c.Gateways[i].Port = 15443
		}
	}
	if c.Listen.Address == "" {
		c.Listen.Address = "0.0.0.0"
	}
	if c.Listen.AccessLog == nil {
		t := true
		c.Listen.AccessLog = &t
	}
	if c.Listen.MaxRequestHeadersKB == 0 {
		c.Listen.MaxRequestHeadersKB = 60
	}
	if c.Listen.MaxHeadersCount == 0 {
		c.Listen.MaxHeadersCount = 100
	}
	if c.Listen.MaxConnections == 0 {
		c.Listen.MaxConnections = 10000
	}
	if c.Metrics.Address == "" {
		c.Metrics.Address = ":9102"
	}
	u := &c.Upstream
	if u.ConnectTimeout == 0 {
		u.ConnectTimeout = 5 * time.Second
	}
	if u.Outlier.ConsecutiveErrors == 0 {
		u.Outlier.ConsecutiveErrors = 5
	}
	if u.Outlier.Interval == 0 {
		u.Outlier.Interval = 10 * time.Second
	}
	if u.Outlier.BaseEjectionTime == 0 {
		u.Outlier.BaseEjectionTime = 30 * time.Second
	}
	if u.Outlier.MaxEjectionPercent == 0 {
		u.Outlier.MaxEjectionPercent = 50
	}
	c.xdsDefaults()
	c.adminDefaults()
	c.peersDefaults()
	c.dataplaneDefaults()
	c.kubernetesDefaults()
	c.acmpcaDefaults()
	c.peerMetadataDefaults()
	c.reverseDefaults()
}

// Problems lists every problem in a defaulted config, by field path.
func (c *Config) Problems() strictyaml.Problems {
	var p strictyaml.Problems
	if td, err := spiffeid.TrustDomainFromString(c.Mesh.TrustDomain); err != nil || td.String() != c.Mesh.TrustDomain {
		p.Addf("mesh.trustDomain", "%q is not a valid trust domain; use a lower-case DNS-like name such as cluster.local", c.Mesh.TrustDomain)
	}
	if len(c.Gateways) == 0 && len(c.DiscoveredGatewayNames()) == 0 { // kubernetes.go may discover them
		p.Addf("gateways", "at least one east-west gateway is required, e.g. {name: eastwest, address: 10.0.0.10, port: 15443}, or a discovery.kubernetes cluster with gateway discovery")
	}
	names := map[string]bool{}
	for i, g := range c.Gateways {
		f := fmt.Sprintf("gateways[%d]", i)
		if errs := validation.IsDNS1123Label(g.Name); len(errs) > 0 {
			p.Addf(f+".name", "%q is not a valid gateway name (lower-case letters, digits and '-')", g.Name)
		} else if names[g.Name] {
			p.Addf(f+".name", "gateway %q is listed twice", g.Name)
		}
		names[g.Name] = true
		if g.Address == "" {
			p.Addf(f+".address", "required: the east-west gateway's IP address or DNS name")
		} else if _, err := netip.ParseAddr(g.Address); err != nil && len(validation.IsDNS1123Subdomain(g.Address)) > 0 {
			p.Addf(f+".address", "%q is neither an IP address nor a DNS name", g.Address)
		}
		if g.Port > 65535 {
			p.Addf(f+".port", "%d is not a valid port; use 1-65535 (Istio's AUTO_PASSTHROUGH port is 15443)", g.Port)
		}
		if g.Priority > MaxGatewayPriority {
			p.Addf(f+".priority", "%d is too high; use 0 (preferred) to %d", g.Priority, MaxGatewayPriority)
		}
	}
	id := c.Identity
	if id.SPIFFEID == "" {
		p.Addf("identity.spiffeID", "required: the fleet's identity, e.g. spiffe://%s/ns/fwdproxy/sa/fwdproxy", c.Mesh.TrustDomain)
	} else if err := catalog.CheckSPIFFEID(id.SPIFFEID); err != nil {
		p.Addf("identity.spiffeID", "%v", err)
	} else if sid := spiffeid.RequireFromString(id.SPIFFEID); sid.TrustDomain().String() != c.Mesh.TrustDomain {
		p.Addf("identity.spiffeID", "trust domain %q differs from mesh.trustDomain %q; the mesh would not accept this identity", sid.TrustDomain(), c.Mesh.TrustDomain)
	}
	switch {
	case id.Files == nil && id.ACMPCA == nil:
		p.Addf("identity", "an identity source is required: files: {certChain, privateKey, roots} or acmpca: {...}")
	case id.Files != nil && id.ACMPCA != nil:
		p.Addf("identity", "set exactly one identity source: files or acmpca, not both")
	case id.Files != nil:
		for _, f := range []struct{ field, path string }{{"certChain", id.Files.CertChain}, {"privateKey", id.Files.PrivateKey}, {"roots", id.Files.Roots}} {
			if f.path == "" {
				p.Addf("identity.files."+f.field, "required: path to a PEM file")
			}
		}
	}
	c.acmpcaProblems(&p)
	c.kubernetesProblems(&p)
	c.xdsProblems(&p)
	c.adminProblems(&p)
	c.peersProblems(&p)
	c.dataplaneProblems(&p)
	c.peerMetadataProblems(&p)
	c.reverseProblems(&p)
	if err := checkHostPort(c.Metrics.Address); err != nil {
		p.Addf("metrics.address", "%v", err)
	}
	if _, err := netip.ParseAddr(c.Listen.Address); err != nil {
		p.Addf("listen.address", "%q is not an IP address; use 0.0.0.0 to listen on all IPv4 addresses", c.Listen.Address)
	}
	if c.Listen.MaxRequestHeadersKB > 8192 {
		p.Addf("listen.maxRequestHeadersKB", "%d is over 8192 (8 MiB), Envoy's largest", c.Listen.MaxRequestHeadersKB)
	}
	if c.Upstream.Outlier.MaxEjectionPercent > 100 {
		p.Addf("upstream.outlierDetection.maxEjectionPercent", "%d is over 100", c.Upstream.Outlier.MaxEjectionPercent)
	}
	return p
}

func checkHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port (%v)", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q has an invalid port", addr)
	}
	return nil
}

// Path resolves p relative to the config file's directory.
func (c *Config) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.Dir, p)
}

// GatewayNames lists the configured gateways' names.
func (c *Config) GatewayNames() []string {
	names := make([]string, 0, len(c.Gateways))
	for _, g := range c.Gateways {
		names = append(names, g.Name)
	}
	slices.Sort(names)
	return names
}

// CatalogOptions is what catalog validation needs from the config.
func (c *Config) CatalogOptions() catalog.Options {
	return catalog.Options{
		Gateways: slices.Sorted(slices.Values(append(c.GatewayNames(), c.DiscoveredGatewayNames()...))),
		Reserved: c.ReservedPorts(),
	}
}

// ReservedPorts are the daemon's own listening ports that a service listener on listen.address
// would collide with (the bind would fail, or take the port from the daemon): xds, metrics and
// admin, the gossip port, and Envoy's admin when the daemon runs Envoy. Sorted by port; port 0
// (any free port) reserves nothing.
func (c *Config) ReservedPorts() []catalog.ReservedPort {
	listen, err := netip.ParseAddr(c.Listen.Address)
	if err != nil {
		return nil // reported by Problems
	}
	own := []struct{ field, addr string }{
		{"xds.address", c.XDS.Address}, {"metrics.address", c.Metrics.Address}, {"admin.address", c.Admin.Address},
		{"peers.bind", c.Peers.Bind},
	}
	if c.Dataplane == "envoy" {
		own = append(own, struct{ field, addr string }{"envoy.adminAddress", c.Envoy.AdminAddress})
	}
	if c.Reverse.Enabled() { // the inbound mTLS listener (reverse.go)
		own = append(own, struct{ field, addr string }{"reverse.port", net.JoinHostPort(c.Reverse.Address, strconv.Itoa(int(c.Reverse.Port)))})
	}
	var out []catalog.ReservedPort
	for _, o := range own {
		host, port, err := net.SplitHostPort(o.addr)
		if err != nil {
			continue
		}
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 || !addrsOverlap(listen, host) {
			continue
		}
		out = append(out, catalog.ReservedPort{Port: uint32(n), Field: o.field, Address: o.addr})
	}
	slices.SortStableFunc(out, func(a, b catalog.ReservedPort) int { return int(a.Port) - int(b.Port) })
	return out
}

// addrsOverlap reports whether a listener on listen and one on host (from host:port) would claim
// the same address: equal, or either unspecified ("" and "::" take every address, 0.0.0.0 every
// IPv4 one). A DNS name other than localhost overlaps only an unspecified listen address.
func addrsOverlap(listen netip.Addr, host string) bool {
	if host == "" {
		return true
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return listen.IsUnspecified()
	}
	a, listen = a.Unmap(), listen.Unmap()
	covers := func(x, y netip.Addr) bool { return x.IsUnspecified() && (x.Is6() || y.Is4()) }
	return a == listen || covers(a, listen) || covers(listen, a)
}

type problems = strictyaml.Problems

func fieldf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

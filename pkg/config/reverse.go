package config

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Reverse is the other direction: services on legacy VMs that mesh workloads call through the
// fleet. The fleet terminates the caller's Istio mTLS on one inbound port (put it on the NLB
// too), picks the VM service by the SNI a sidecar sends for an ISTIO_MUTUAL destination
// (outbound_.PORT_._.HOST), checks the caller's principal and forwards in plain HTTP or TCP to a
// healthy backend. `fwdproxy mesh-config --reverse` renders the mesh side from this section.
type Reverse struct {
	// Address the inbound listener binds; default listen.address.
	Address string `yaml:"address"`
	// Port of the inbound mTLS listener; default 15443 (as a gateway's, so the NLB forwards one
	// more port of the usual kind).
	Port uint32 `yaml:"port"`
	// LoadBalancer is the name (or IP) mesh workloads connect to: the fleet's NLB. Only
	// mesh-config uses it (the ServiceEntry's endpoint).
	LoadBalancer string `yaml:"loadBalancer"`
	// LoadBalancerPort is the NLB's port forwarding to Port; default Port.
	LoadBalancerPort uint32 `yaml:"loadBalancerPort"`
	// Namespace of the rendered ServiceEntries and DestinationRules; default istio-system.
	Namespace string `yaml:"namespace"`
	// ExportTo of the rendered resources; default ["*"].
	ExportTo []string `yaml:"exportTo"`
	// HealthCheck is the active health check of every backend.
	HealthCheck HealthCheck `yaml:"healthCheck"`
	// ConnectTimeout to a backend; default 2s.
	ConnectTimeout time.Duration `yaml:"connectTimeout"`
	// Outlier ejects backends that fail passively; defaults as upstream.outlierDetection's.
	Outlier  Outlier          `yaml:"outlierDetection"`
	Services []ReverseService `yaml:"services"`
}

// HealthCheck is an active health check: a TCP connect, or an HTTP GET of a port's
// healthCheckPath answered 2xx.
type HealthCheck struct {
	// Interval between checks of one backend; default 5s.
	Interval time.Duration `yaml:"interval"`
	// Timeout of one check; default 2s.
	Timeout time.Duration `yaml:"timeout"`
	// UnhealthyThreshold failed checks mark a backend unhealthy; default 2.
	UnhealthyThreshold uint32 `yaml:"unhealthyThreshold"`
	// HealthyThreshold passed checks mark it healthy again; default 1.
	HealthyThreshold uint32 `yaml:"healthyThreshold"`
}

// ReverseService is one service on legacy VMs.
type ReverseService struct {
	// Host is the name mesh workloads call, e.g. billing.vm.example.internal.
	Host string `yaml:"host"`
	// Aliases are more names for the same service (more ServiceEntry hosts, more SNIs).
	Aliases []string      `yaml:"aliases"`
	Ports   []ReversePort `yaml:"ports"`
	// Backends are the VMs: IP addresses or DNS names (every address a name resolves to is a
	// backend), optionally with :PORT to override the ports' targetPort.
	Backends []string `yaml:"backends"`
	// AllowedPrincipals are the callers let through: SPIFFE IDs (spiffe://TD/ns/NS/sa/SA) or
	// Istio's principal form (TD/ns/NS/sa/SA). Empty refuses every caller.
	AllowedPrincipals []string `yaml:"allowedPrincipals"`
}

// ReversePort is one port of a VM service.
type ReversePort struct {
	// Number is the port mesh workloads call (the ServiceEntry port; in the SNI).
	Number uint32 `yaml:"number"`
	// Protocol: http or tcp.
	Protocol catalog.Protocol `yaml:"protocol"`
	Name     string           `yaml:"name"`
	// TargetPort is the backends' port; default Number.
	TargetPort uint32 `yaml:"targetPort"`
	// HealthCheckPath, on an http port, makes the health check an HTTP GET; default: TCP connect.
	HealthCheckPath string `yaml:"healthCheckPath"`
}

// Enabled reports whether the reverse direction is configured.
func (r *Reverse) Enabled() bool { return len(r.Services) > 0 }

// Principals returns the allowed principals as SPIFFE IDs (Istio's form gets its scheme).
func (s *ReverseService) Principals() []string {
	out := make([]string, 0, len(s.AllowedPrincipals))
	for _, p := range s.AllowedPrincipals {
		if !strings.HasPrefix(p, "spiffe://") {
			p = "spiffe://" + p
		}
		out = append(out, p)
	}
	return out
}

func (c *Config) reverseDefaults() {
	r := &c.Reverse
	if r.Address == "" {
		r.Address = c.Listen.Address
	}
	if r.Port == 0 {
		r.Port = 15443
	}
	if r.LoadBalancerPort == 0 {
		r.LoadBalancerPort = r.Port
	}
	if r.Namespace == "" {
		r.Namespace = "istio-system"
	}
	if len(r.ExportTo) == 0 {
		r.ExportTo = []string{"*"}
	}
	h := &r.HealthCheck
	if h.Interval == 0 {
		h.Interval = 5 * time.Second
	}
	if h.Timeout == 0 {
		h.Timeout = 2 * time.Second
	}
	if h.UnhealthyThreshold == 0 {
		h.UnhealthyThreshold = 2
	}
	if h.HealthyThreshold == 0 {
		h.HealthyThreshold = 1
	}
	if r.ConnectTimeout == 0 {
		r.ConnectTimeout = 2 * time.Second
	}
	o := &r.Outlier
	if o.ConsecutiveErrors == 0 {
		o.ConsecutiveErrors = 5
	}
	if o.Interval == 0 {
		o.Interval = 10 * time.Second
	}
	if o.BaseEjectionTime == 0 {
		o.BaseEjectionTime = 30 * time.Second
	}
	if o.MaxEjectionPercent == 0 {
		o.MaxEjectionPercent = 50
	}
	for i := range r.Services {
		s := &r.Services[i]
		s.Host = strings.TrimSuffix(strings.ToLower(s.Host), ".")
		for j := range s.Ports {
			p := &s.Ports[j]
			p.Protocol = catalog.Protocol(strings.ToLower(string(p.Protocol)))
			if p.TargetPort == 0 {
				p.TargetPort = p.Number
			}
		}
	}
}

func (c *Config) reverseProblems(p *problems) {
	r := &c.Reverse
	if !r.Enabled() {
		return
	}
	if _, err := netip.ParseAddr(r.Address); err != nil {
		p.Addf("reverse.address", "%q is not an IP address; use 0.0.0.0 to listen on all IPv4 addresses", r.Address)
	}
	if r.Port > 65535 {
		p.Addf("reverse.port", "%d is not a valid port; use 1-65535 (default 15443)", r.Port)
	}
	if r.LoadBalancerPort > 65535 {
		p.Addf("reverse.loadBalancerPort", "%d is not a valid port; use 1-65535", r.LoadBalancerPort)
	}
	if r.LoadBalancer != "" {
		if _, err := netip.ParseAddr(r.LoadBalancer); err != nil && len(validation.IsDNS1123Subdomain(r.LoadBalancer)) > 0 {
			p.Addf("reverse.loadBalancer", "%q is neither an IP address nor a DNS name", r.LoadBalancer)
		}
	}
	if len(validation.IsDNS1123Label(r.Namespace)) > 0 {
		p.Addf("reverse.namespace", "%q is not a valid namespace name", r.Namespace)
	}
	for _, rp := range c.ReservedPorts() {
		if rp.Port == r.Port && rp.Field != "reverse.port" {
			p.Addf("reverse.port", "%d is taken by %s (%s); choose another port", r.Port, rp.Field, rp.Address)
		}
	}
	h := r.HealthCheck
	if h.Interval < 0 || h.Timeout < 0 {
		p.Addf("reverse.healthCheck", "interval and timeout must be positive durations such as 5s")
	} else if h.Timeout > h.Interval {
		p.Addf("reverse.healthCheck.timeout", "%v is longer than the interval %v; a check would overlap the next", h.Timeout, h.Interval)
	}
	if r.Outlier.MaxEjectionPercent > 100 {
		p.Addf("reverse.outlierDetection.maxEjectionPercent", "%d is over 100", r.Outlier.MaxEjectionPercent)
	}
	if r.ConnectTimeout < 0 {
		p.Addf("reverse.connectTimeout", "%v is negative; use a duration such as 2s", r.ConnectTimeout)
	}
	sni := map[string]string{} // SNI -> field of its first owner
	for i, s := range r.Services {
		f := fieldf("reverse.services[%d]", i)
		hosts := append([]string{s.Host}, s.Aliases...)
		for j, h := range hosts {
			hf := f + ".host"
			if j > 0 {
				hf = fieldf("%s.aliases[%d]", f, j-1)
			}
			if errs := validation.IsDNS1123Subdomain(h); len(errs) > 0 || !strings.Contains(h, ".") {
				p.Addf(hf, "%q is not a fully qualified DNS name, e.g. billing.vm.example.internal", h)
			}
		}
		if len(s.Ports) == 0 {
			p.Addf(f+".ports", "at least one port is required, e.g. {number: 8080, protocol: http}")
		}
		for j, port := range s.Ports {
			pf := fieldf("%s.ports[%d]", f, j)
			if port.Number == 0 || port.Number > 65535 {
				p.Addf(pf+".number", "%d is not a valid port; use 1-65535", port.Number)
			}
			if port.TargetPort > 65535 {
				p.Addf(pf+".targetPort", "%d is not a valid port; use 1-65535", port.TargetPort)
			}
			switch port.Protocol {
			case catalog.HTTP, catalog.TCP:
			default:
				p.Addf(pf+".protocol", "%q is not supported in the reverse direction; use http or tcp", port.Protocol)
			}
			if port.HealthCheckPath != "" && (port.Protocol != catalog.HTTP || !strings.HasPrefix(port.HealthCheckPath, "/")) {
				p.Addf(pf+".healthCheckPath", "%q: an HTTP path such as /healthz, on an http port only", port.HealthCheckPath)
			}
			if port.Name != "" && len(validation.IsDNS1123Label(port.Name)) > 0 {
				p.Addf(pf+".name", "%q is not a valid port name (lower-case letters, digits and '-')", port.Name)
			}
			for _, h := range hosts {
				key := fmt.Sprintf("outbound_.%d_._.%s", port.Number, h)
				if prev, ok := sni[key]; ok {
					p.Addf(pf+".number", "port %d of %s is already served by %s; each host and port is one VM service", port.Number, h, prev)
				} else {
					sni[key] = pf
				}
			}
		}
		if len(s.Backends) == 0 {
			p.Addf(f+".backends", "at least one backend is required: the VMs' IP addresses or DNS names")
		}
		for j, b := range s.Backends {
			if err := checkBackend(b); err != nil {
				p.Addf(fieldf("%s.backends[%d]", f, j), "%v", err)
			}
		}
		for j, pr := range s.Principals() {
			id, err := spiffeid.FromString(pr)
			if err != nil || id.Path() == "" {
				p.Addf(fieldf("%s.allowedPrincipals[%d]", f, j), "%q is not a principal; use spiffe://TD/ns/NS/sa/SA or Istio's TD/ns/NS/sa/SA", s.AllowedPrincipals[j])
			}
		}
	}
}

// checkBackend accepts IP, NAME, IP:PORT or NAME:PORT ([v6]:PORT).
func checkBackend(b string) error {
	host := b
	if h, port, err := net.SplitHostPort(b); err == nil {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("%q has an invalid port; use 1-65535", b)
		}
		host = h
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if len(validation.IsDNS1123Subdomain(host)) > 0 {
		return fmt.Errorf("%q is neither an IP address nor a DNS name (optionally with :PORT)", b)
	}
	return nil
}

// SplitBackend returns a backend's host and port, def when it names none.
func SplitBackend(b string, def uint32) (string, uint32) {
	if h, port, err := net.SplitHostPort(b); err == nil {
		n, _ := strconv.Atoi(port)
		return h, uint32(n)
	}
	return b, def
}

// Package meshconfig renders the Istio resources the mesh side needs for the fleet: the
// east-west Gateway in AUTO_PASSTHROUGH mode that the fleet's upstream connections enter by, an
// AuthorizationPolicy per namespace that lets the fleet's principal call the catalog's services,
// and, for the reverse direction, a ServiceEntry and a DestinationRule (tls.mode ISTIO_MUTUAL) per
// service on legacy VMs, so that an unmodified mesh workload reaches it by name through the
// fleet's load balancer with Istio mTLS. Rendering is a pure function of its inputs.
package meshconfig

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.yaml.in/yaml/v3"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/fwdproxy/fwdproxy/internal/strictyaml"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Options are the inputs of Render.
type Options struct {
	// FleetSPIFFEID is the fleet's identity, e.g. spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy.
	FleetSPIFFEID string
	// Catalog lists the services the fleet calls.
	Catalog *catalog.Catalog
	// GatewayNamespace holds the east-west gateway; default istio-system.
	GatewayNamespace string
	// PolicyName names each AuthorizationPolicy; default allow-fwdproxy.
	PolicyName string
	// Namespaces get a policy even without a catalog service, e.g. the namespaces a
	// Kubernetes source discovers (mesh-config does not contact the clusters).
	Namespaces []string
	// Reverse, when set, adds ServiceEntries for VM services behind the fleet's load balancer.
	Reverse *Reverse
}

// Reverse describes services on legacy VMs that mesh workloads reach through the fleet's load
// balancer (the file given to mesh-config --reverse).
type Reverse struct {
	// LoadBalancer is the fleet's load balancer: a DNS name (resolution DNS) or an IP (STATIC).
	LoadBalancer string `yaml:"loadBalancer"`
	// Namespace of the ServiceEntries; default istio-system.
	Namespace string `yaml:"namespace"`
	// ExportTo limits which namespaces see the entries; default ["*"].
	ExportTo []string `yaml:"exportTo"`
	// Port is the load balancer's port to the fleet's inbound mTLS listener (reverse.port);
	// default 15443. Every service port's endpoint is this one port: the fleet picks the
	// service by the SNI.
	Port     uint32           `yaml:"port"`
	Services []ReverseService `yaml:"services"`
}

// ReverseService is one VM service.
type ReverseService struct {
	// Host is the name mesh workloads call, e.g. billing.vm.example.internal.
	Host string `yaml:"host"`
	// Aliases are more names of the service (more ServiceEntry hosts, each with its rule).
	Aliases []string       `yaml:"aliases"`
	Ports   []catalog.Port `yaml:"ports"`
}

// LoadReverse reads and checks a reverse file; errors name the file, line and field.
func LoadReverse(path string) (*Reverse, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read reverse file: %w", err)
	}
	var r Reverse
	doc, err := strictyaml.Decode(path, data, &r)
	if err != nil {
		return nil, err
	}
	if err := r.Problems().In(doc); err != nil {
		return nil, err
	}
	return &r, nil
}

// Problems lists what is wrong in a reverse description.
func (r *Reverse) Problems() strictyaml.Problems {
	var p strictyaml.Problems
	if r.LoadBalancer == "" {
		p.Addf("loadBalancer", "required: the fleet load balancer's DNS name or IP address")
	} else if _, err := netip.ParseAddr(r.LoadBalancer); err != nil && len(validation.IsDNS1123Subdomain(r.LoadBalancer)) > 0 {
		p.Addf("loadBalancer", "%q is neither an IP address nor a DNS name", r.LoadBalancer)
	}
	if r.Port > 65535 {
		p.Addf("port", "%d is not a valid port; use the load balancer's port to reverse.port (default 15443)", r.Port)
	}
	if r.Namespace != "" && len(validation.IsDNS1123Label(r.Namespace)) > 0 {
		p.Addf("namespace", "%q is not a valid namespace name", r.Namespace)
	}
	if len(r.Services) == 0 {
		p.Addf("services", "at least one service is required, e.g. {host: billing.vm.example.internal, ports: [{number: 8080, protocol: http}]}")
	}
	// The services must be valid catalog entries as far as hosts and ports go.
	cat := &catalog.Catalog{}
	for _, s := range r.Services {
		cat.Services = append(cat.Services, catalog.Service{Host: s.Host, Aliases: s.Aliases, Ports: s.Ports, Identities: []string{"spiffe://vm/placeholder"}})
	}
	for _, prob := range cat.Problems(catalog.Options{}) {
		if !strings.Contains(prob.Field, ".identities") {
			p = append(p, prob)
		}
	}
	return p
}

// Render returns the resources as one multi-document YAML stream.
func Render(o Options) ([]byte, error) {
	sid, err := spiffeid.FromString(o.FleetSPIFFEID)
	if err != nil {
		return nil, fmt.Errorf("fleet SPIFFE ID %q: %w", o.FleetSPIFFEID, err)
	}
	// Istio principals are the SPIFFE ID without its scheme.
	principal := strings.TrimPrefix(sid.String(), "spiffe://")
	gwNS := or(o.GatewayNamespace, "istio-system")
	policyName := or(o.PolicyName, "allow-fwdproxy")
	cat := o.Catalog
	if cat == nil {
		cat = &catalog.Catalog{}
	}

	var out bytes.Buffer
	fmt.Fprintf(&out, "# Istio resources for the fwdproxy fleet %s.\n", o.FleetSPIFFEID)
	fmt.Fprintf(&out, "# Generated by 'fwdproxy mesh-config'; review, then apply with kubectl apply -f.\n")

	// The east-west gateway: Istio's own samples/multicluster/expose-services.yaml, plus the
	// catalog's service hosts outside *.local (AUTO_PASSTHROUGH matches the service host in the
	// SNI; aliases and subset hosts are only Host headers on the fleet's side).
	hosts := []string{"*.local"}
	for _, s := range cat.Services {
		if !strings.HasSuffix(s.Host, ".local") && !slices.Contains(hosts, s.Host) {
			hosts = append(hosts, s.Host)
		}
	}
	writeDoc(&out, []string{
		"The east-west gateway the fleet connects to: TLS passed through to the target sidecar,",
		"routed by the SNI the fleet sets (outbound_.PORT_.SUBSET_.HOST).",
	}, resource{
		APIVersion: "networking.istio.io/v1", Kind: "Gateway",
		Metadata: metadata{Name: "cross-network-gateway", Namespace: gwNS},
		Spec: gatewaySpec{
			Selector: map[string]string{"istio": "eastwestgateway"},
			Servers: []server{{
				Port:  serverPort{Number: 15443, Name: "tls", Protocol: "TLS"},
				TLS:   serverTLS{Mode: "AUTO_PASSTHROUGH"},
				Hosts: hosts,
			}},
		},
	})

	// One AuthorizationPolicy per namespace whose workloads serve catalog services: the
	// namespace of each service identity (where the sidecar enforces), else the host's.
	byNS := map[string][]string{}
	var unplaced []string
	for _, s := range cat.Services {
		nss := serviceNamespaces(s)
		if len(nss) == 0 {
			unplaced = append(unplaced, s.Host)
		}
		for _, ns := range nss {
			if !slices.Contains(byNS[ns], s.Host) {
				byNS[ns] = append(byNS[ns], s.Host)
			}
		}
	}
	for _, ns := range o.Namespaces {
		if _, ok := byNS[ns]; !ok {
			byNS[ns] = nil
		}
	}
	namespaces := make([]string, 0, len(byNS))
	for ns := range byNS {
		namespaces = append(namespaces, ns)
	}
	slices.Sort(namespaces)
	for _, ns := range namespaces {
		svcs := byNS[ns]
		slices.Sort(svcs)
		what := "the services it discovers in namespace " + ns
		if len(svcs) > 0 {
			what = strings.Join(svcs, ", ")
		}
		comment := []string{
			"Lets the fleet call " + what + ".",
			"Needed only where the namespace already restricts callers with ALLOW policies: in a",
			"namespace with no ALLOW policy, applying this one DENIES every other caller.",
		}
		writeDoc(&out, comment, resource{
			APIVersion: "security.istio.io/v1", Kind: "AuthorizationPolicy",
			Metadata: metadata{Name: policyName, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/managed-by": "fwdproxy"}},
			Spec: authzSpec{
				Action: "ALLOW",
				Rules:  []rule{{From: []from{{Source: source{Principals: []string{principal}}}}}},
			},
		})
	}
	if len(unplaced) > 0 {
		fmt.Fprintf(&out, "# No namespace known for %s (identities not of the form\n# spiffe://TD/ns/NS/sa/SA and hosts not NAME.NS.svc.DOMAIN): allow principal %q there by hand.\n",
			strings.Join(unplaced, ", "), principal)
	}

	if r := o.Reverse; r != nil {
		resolution := "DNS"
		if _, err := netip.ParseAddr(r.LoadBalancer); err == nil {
			resolution = "STATIC"
		}
		exportTo := r.ExportTo
		if len(exportTo) == 0 {
			exportTo = []string{"*"}
		}
		lbPort := r.Port
		if lbPort == 0 {
			lbPort = 15443
		}
		ns := or(r.Namespace, "istio-system")
		labels := map[string]string{"app.kubernetes.io/managed-by": "fwdproxy"}
		svcs := slices.Clone(r.Services)
		slices.SortFunc(svcs, func(a, b ReverseService) int { return strings.Compare(a.Host, b.Host) })
		for _, s := range svcs {
			var ports []sePort
			epPorts := map[string]uint32{}
			sp := slices.Clone(s.Ports)
			slices.SortFunc(sp, func(a, b catalog.Port) int { return int(a.Number) - int(b.Number) })
			for _, p := range sp {
				proto := strings.ToUpper(string(p.Protocol))
				name := p.Name
				if name == "" {
					name = fmt.Sprintf("%s-%d", strings.ToLower(proto), p.Number)
				}
				ports = append(ports, sePort{Number: p.Number, Name: name, Protocol: proto})
				epPorts[name] = lbPort
			}
			hosts := append([]string{s.Host}, s.Aliases...)
			writeDoc(&out, []string{
				s.Host + " runs on legacy VMs; mesh workloads reach it through the fleet's load balancer,",
				"port " + fmt.Sprint(lbPort) + " for every service port (the fleet picks the service by the SNI), and",
				"verify that the fleet answers as " + o.FleetSPIFFEID + ".",
			}, resource{
				APIVersion: "networking.istio.io/v1", Kind: "ServiceEntry",
				Metadata: metadata{Name: "vm-" + strings.ReplaceAll(s.Host, ".", "-"), Namespace: ns, Labels: labels},
				Spec: serviceEntrySpec{
					// MESH_INTERNAL: the fleet holds a mesh identity and speaks Istio mTLS.
					Hosts: hosts, ExportTo: exportTo, Location: "MESH_INTERNAL", Resolution: resolution,
					Ports: ports, Endpoints: []seEndpoint{{Address: r.LoadBalancer, Ports: epPorts}},
					SubjectAltNames: []string{o.FleetSPIFFEID},
				},
			})
			for _, h := range hosts {
				writeDoc(&out, []string{
					"Istio mTLS to " + h + ": the sidecar sends its workload certificate and the SNI",
					"outbound_.PORT_._." + h + ", which the fleet routes and authorizes on.",
				}, resource{
					APIVersion: "networking.istio.io/v1", Kind: "DestinationRule",
					Metadata: metadata{Name: "vm-" + strings.ReplaceAll(h, ".", "-"), Namespace: ns, Labels: labels},
					Spec:     destinationRuleSpec{Host: h, ExportTo: exportTo, TrafficPolicy: trafficPolicy{TLS: clientTLS{Mode: "ISTIO_MUTUAL"}}},
				})
			}
		}
	}
	return out.Bytes(), nil
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// serviceNamespaces are the namespaces of a service's workload identities
// (spiffe://TD/ns/NS/sa/SA), or else the namespace in its host (NAME.NS.svc.DOMAIN).
func serviceNamespaces(s catalog.Service) []string {
	var out []string
	for _, id := range s.Identities {
		sid, err := spiffeid.FromString(id)
		if err != nil {
			continue
		}
		parts := strings.Split(strings.TrimPrefix(sid.Path(), "/"), "/")
		if len(parts) == 4 && parts[0] == "ns" && parts[2] == "sa" && !slices.Contains(out, parts[1]) {
			out = append(out, parts[1])
		}
	}
	if len(out) == 0 {
		if labels := strings.Split(s.Host, "."); len(labels) >= 4 && labels[2] == "svc" {
			out = append(out, labels[1])
		}
	}
	slices.Sort(out)
	return out
}

func writeDoc(out *bytes.Buffer, comment []string, r resource) {
	out.WriteString("---\n")
	for _, c := range comment {
		out.WriteString("# " + c + "\n")
	}
	enc := yaml.NewEncoder(out)
	enc.SetIndent(2)
	if err := enc.Encode(r); err != nil {
		panic(err) // plain structs of strings and numbers always encode
	}
	enc.Close()
}

// The resource shapes, with Istio's field names.

type resource struct {
	APIVersion string   `yaml:"apiVersion"`
	Kind       string   `yaml:"kind"`
	Metadata   metadata `yaml:"metadata"`
	Spec       any      `yaml:"spec"`
}

type metadata struct {
	Name      string            `yaml:"name"`
	Namespace string            `yaml:"namespace"`
	Labels    map[string]string `yaml:"labels,omitempty"`
}

type gatewaySpec struct {
	Selector map[string]string `yaml:"selector"`
	Servers  []server          `yaml:"servers"`
}

type server struct {
	Port  serverPort `yaml:"port"`
	TLS   serverTLS  `yaml:"tls"`
	Hosts []string   `yaml:"hosts"`
}

type serverPort struct {
	Number   uint32 `yaml:"number"`
	Name     string `yaml:"name"`
	Protocol string `yaml:"protocol"`
}

type serverTLS struct {
	Mode string `yaml:"mode"`
}

type authzSpec struct {
	Action string `yaml:"action"`
	Rules  []rule `yaml:"rules"`
}

type rule struct {
	From []from `yaml:"from"`
}

type from struct {
	Source source `yaml:"source"`
}

type source struct {
	Principals []string `yaml:"principals"`
}

type serviceEntrySpec struct {
	Hosts           []string     `yaml:"hosts"`
	ExportTo        []string     `yaml:"exportTo"`
	Location        string       `yaml:"location"`
	Resolution      string       `yaml:"resolution"`
	Ports           []sePort     `yaml:"ports"`
	Endpoints       []seEndpoint `yaml:"endpoints"`
	SubjectAltNames []string     `yaml:"subjectAltNames"`
}

type destinationRuleSpec struct {
	Host          string        `yaml:"host"`
	ExportTo      []string      `yaml:"exportTo"`
	TrafficPolicy trafficPolicy `yaml:"trafficPolicy"`
}

type trafficPolicy struct {
	TLS clientTLS `yaml:"tls"`
}

type clientTLS struct {
	Mode string `yaml:"mode"`
}

type sePort struct {
	Number   uint32 `yaml:"number"`
	Name     string `yaml:"name"`
	Protocol string `yaml:"protocol"`
}

type seEndpoint struct {
	Address string `yaml:"address"`
	// Ports maps a service port's name to the endpoint's port.
	Ports map[string]uint32 `yaml:"ports,omitempty"`
}

package config

import (
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
)

// KubernetesCluster is one Kubernetes cluster to discover mesh services in. A Service is
// exposed through the fleet when it is in one of Namespaces (all when empty), matches
// LabelSelector (when set) and carries ExposeAnnotation: "true" (when set).
type KubernetesCluster struct {
	// Name identifies the cluster in logs and metrics and names its discovered east-west gateway;
	// a DNS label such as "primary".
	Name string `yaml:"name"`
	// Kubeconfig file; empty uses the in-cluster service account.
	Kubeconfig string `yaml:"kubeconfig"`
	// Context in the kubeconfig; empty uses its current context.
	Context string `yaml:"context"`
	// Namespaces to watch; empty watches all namespaces.
	Namespaces []string `yaml:"namespaces"`
	// LabelSelector Services must match, e.g. "fwdproxy.io/expose=true"; empty matches all.
	LabelSelector string `yaml:"labelSelector"`
	// ExposeAnnotation, when set, is an opt-in annotation: only Services annotated with it and
	// the value "true" are exposed, e.g. fwdproxy.io/expose.
	ExposeAnnotation string `yaml:"exposeAnnotation"`
	// ClusterDomain of the cluster's Service names; default cluster.local.
	ClusterDomain string `yaml:"clusterDomain"`
	// TrustDomain of the cluster's workload identities; default mesh.trustDomain.
	TrustDomain string `yaml:"trustDomain"`
	// Gateway discovers the cluster's east-west gateway address from its Service.
	Gateway KubernetesGateway `yaml:"gateway"`
}

// KubernetesGateway is how a cluster's east-west gateway is found: the load-balancer address
// (status.loadBalancer.ingress, IP or host name) of the Services matching LabelSelector.
type KubernetesGateway struct {
	// Discover turns gateway discovery on; default true. When on, the cluster's services are
	// reached only through its discovered gateway; when off, through the configured gateways.
	Discover *bool `yaml:"discover"`
	// Name of the discovered gateway (in metrics and endpoint host names); default the cluster's name.
	Name string `yaml:"name"`
	// Namespace of the gateway Service; empty searches all namespaces.
	Namespace string `yaml:"namespace"`
	// LabelSelector of the gateway Service; default "istio=eastwestgateway".
	LabelSelector string `yaml:"labelSelector"`
	// Port is the gateway's AUTO_PASSTHROUGH port on the load balancer; default 15443.
	Port uint32 `yaml:"port"`
	// Network is informational: the mesh network behind this gateway.
	Network string `yaml:"network"`
	// Priority of the discovered gateway for failover, as gateways[].priority: 0 (default) for
	// the fleet's local cluster, higher for clusters that take over when it fails.
	Priority uint32 `yaml:"priority"`
}

// MaxGatewayPriority is the highest gateway priority (the data planes keep 128 EDS levels).
const MaxGatewayPriority = 127

// Enabled reports whether gateway discovery is on.
func (g KubernetesGateway) Enabled() bool { return g.Discover == nil || *g.Discover }

// DiscoveredGatewayNames lists the names of gateways discovered from Kubernetes.
func (c *Config) DiscoveredGatewayNames() []string {
	var names []string
	for _, k := range c.Discovery.Kubernetes {
		if k.Gateway.Enabled() {
			names = append(names, k.Gateway.Name)
		}
	}
	slices.Sort(names)
	return names
}

func (c *Config) kubernetesDefaults() {
	for i := range c.Discovery.Kubernetes {
		k := &c.Discovery.Kubernetes[i]
		if k.ClusterDomain == "" {
			k.ClusterDomain = "cluster.local"
		}
		if k.TrustDomain == "" {
			k.TrustDomain = c.Mesh.TrustDomain
		}
		if k.Gateway.Name == "" {
			k.Gateway.Name = k.Name
		}
		if k.Gateway.LabelSelector == "" {
			k.Gateway.LabelSelector = "istio=eastwestgateway"
		}
		if k.Gateway.Port == 0 {
			k.Gateway.Port = 15443
		}
	}
}

func (c *Config) kubernetesProblems(p *problems) {
	names := map[string]bool{}
	gateways := map[string]bool{}
	for _, g := range c.Gateways {
		gateways[g.Name] = true
	}
	for i, k := range c.Discovery.Kubernetes {
		f := fieldf("discovery.kubernetes[%d]", i)
		switch {
		case k.Name == "":
			p.Addf(f+".name", "required: a name for this cluster, e.g. primary")
		case len(validation.IsDNS1123Label(k.Name)) > 0:
			p.Addf(f+".name", "%q is not a valid cluster name; use lower-case letters, digits and '-', e.g. primary", k.Name)
		case names[k.Name]:
			p.Addf(f+".name", "cluster %q is listed twice; give each cluster its own name", k.Name)
		}
		names[k.Name] = true
		for j, ns := range k.Namespaces {
			if len(validation.IsDNS1123Label(ns)) > 0 {
				p.Addf(fieldf("%s.namespaces[%d]", f, j), "%q is not a valid namespace name", ns)
			}
		}
		if _, err := labels.Parse(k.LabelSelector); err != nil {
			p.Addf(f+".labelSelector", "%q is not a label selector (%v); write e.g. fwdproxy.io/expose=true", k.LabelSelector, err)
		}
		if k.ExposeAnnotation != "" {
			if errs := validation.IsQualifiedName(k.ExposeAnnotation); len(errs) > 0 {
				p.Addf(f+".exposeAnnotation", "%q is not a valid annotation name; use e.g. fwdproxy.io/expose", k.ExposeAnnotation)
			}
		}
		if len(validation.IsDNS1123Subdomain(k.ClusterDomain)) > 0 {
			p.Addf(f+".clusterDomain", "%q is not a DNS domain; the default is cluster.local", k.ClusterDomain)
		}
		if td, err := spiffeid.TrustDomainFromString(k.TrustDomain); err != nil || td.String() != k.TrustDomain {
			p.Addf(f+".trustDomain", "%q is not a valid trust domain; use a lower-case DNS-like name such as cluster.local", k.TrustDomain)
		}
		g := k.Gateway
		if !g.Enabled() {
			continue
		}
		if k.Name != "" && len(validation.IsDNS1123Label(g.Name)) > 0 {
			p.Addf(f+".gateway.name", "%q is not a valid gateway name (lower-case letters, digits and '-')", g.Name)
		} else if gateways[g.Name] && g.Name != "" {
			p.Addf(f+".gateway.name", "gateway %q is already configured under gateways or by another cluster; set gateway.name to a distinct name", g.Name)
		}
		gateways[g.Name] = true
		if g.Namespace != "" && len(validation.IsDNS1123Label(g.Namespace)) > 0 {
			p.Addf(f+".gateway.namespace", "%q is not a valid namespace name", g.Namespace)
		}
		if sel, err := labels.Parse(g.LabelSelector); err != nil || sel.Empty() {
			p.Addf(f+".gateway.labelSelector", "%q is not a non-empty label selector; the default is istio=eastwestgateway", g.LabelSelector)
		}
		if g.Port > 65535 {
			p.Addf(f+".gateway.port", "%d is not a valid port; use 1-65535 (Istio's AUTO_PASSTHROUGH port is 15443)", g.Port)
		}
		if g.Priority > MaxGatewayPriority {
			p.Addf(f+".gateway.priority", "%d is too high; use 0 (preferred) to %d", g.Priority, MaxGatewayPriority)
		}
	}
}

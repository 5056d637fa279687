package config

import (
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// PeerMetadata makes the mesh see the fleet as a workload (mesh.peerMetadata): every HTTP request
// carries Istio's peer metadata headers (x-envoy-peer-metadata-id, x-envoy-peer-metadata), which
// the target's sidecar decodes, so Istio's telemetry (istio_requests_total, Kiali) labels the
// caller with this workload, namespace and canonical service instead of "unknown". TCP carries
// none: fwdproxy does not take part in Istio's TCP metadata exchange (ALPN istio only).
type PeerMetadata struct {
	// Enabled turns the headers on; default false.
	Enabled bool `yaml:"enabled"`
	// WorkloadName is source_workload; default: the service account of identity.spiffeID.
	WorkloadName string `yaml:"workloadName"`
	// Namespace is source_workload_namespace; default, and the only accepted value when
	// identity.spiffeID is of Istio's form: its namespace (Istio takes the namespace from the
	// certificate before the metadata).
	Namespace string `yaml:"namespace"`
	// Labels are the workload's app and version labels (source_app, source_version); unset
	// ones are not sent, and Istio reports them as "unknown".
	Labels PeerMetadataLabels `yaml:"labels"`
	// CanonicalService is source_canonical_service (label service.istio.io/canonical-name);
	// default: labels.app, else workloadName, as Istio defaults it for a pod.
	CanonicalService string `yaml:"canonicalService"`
	// CanonicalRevision is source_canonical_revision (service.istio.io/canonical-revision);
	// default: labels.version, else "latest", as Istio defaults it.
	CanonicalRevision string `yaml:"canonicalRevision"`
	// ClusterID is source_cluster (CLUSTER_ID); unset: not sent ("unknown").
	ClusterID string `yaml:"clusterID"`
}

// PeerMetadataLabels are the workload labels Istio's telemetry reads.
type PeerMetadataLabels struct {
	App     string `yaml:"app"`
	Version string `yaml:"version"`
}

// istioWorkload splits an Istio workload identity, spiffe://TD/ns/NS/sa/SA, into NS and SA.
func istioWorkload(id string) (ns, sa string, ok bool) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return "", "", false
	}
	parts := strings.Split(strings.TrimPrefix(sid.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || parts[1] == "" || parts[3] == "" {
		return "", "", false
	}
	return parts[1], parts[3], true
}

func (c *Config) peerMetadataDefaults() {
	pm := &c.Mesh.PeerMetadata
	if ns, sa, ok := istioWorkload(c.Identity.SPIFFEID); ok {
		if pm.Namespace == "" {
			pm.Namespace = ns
		}
		if pm.WorkloadName == "" {
			pm.WorkloadName = sa
		}
	}
	if pm.CanonicalService == "" {
		pm.CanonicalService = pm.Labels.App
		if pm.CanonicalService == "" {
			pm.CanonicalService = pm.WorkloadName
		}
	}
	if pm.CanonicalRevision == "" {
		pm.CanonicalRevision = pm.Labels.Version
		if pm.CanonicalRevision == "" {
			pm.CanonicalRevision = "latest"
		}
	}
}

func (c *Config) peerMetadataProblems(p *problems) {
	pm := c.Mesh.PeerMetadata
	const f = "mesh.peerMetadata."
	ns, _, istioForm := istioWorkload(c.Identity.SPIFFEID)
	switch {
	case pm.WorkloadName == "" && pm.Enabled:
		p.Addf(f+"workloadName", "required: identity.spiffeID is not of Istio's form spiffe://TD/ns/NS/sa/SA, so no workload name can be derived from it; set the name Istio's telemetry should show, e.g. fwdproxy")
	case pm.WorkloadName != "" && len(validation.IsDNS1123Label(pm.WorkloadName)) > 0:
		p.Addf(f+"workloadName", "%q is not a valid workload name; use a DNS label (lower-case letters, digits and '-', at most 63), e.g. fwdproxy", pm.WorkloadName)
	}
	switch {
	case pm.Namespace == "" && pm.Enabled:
		p.Addf(f+"namespace", "required: identity.spiffeID is not of Istio's form spiffe://TD/ns/NS/sa/SA, so no namespace can be derived from it; set the namespace Istio's telemetry should show")
	case pm.Namespace != "" && len(validation.IsDNS1123Label(pm.Namespace)) > 0:
		p.Addf(f+"namespace", "%q is not a valid namespace; use a DNS label (lower-case letters, digits and '-')", pm.Namespace)
	case istioForm && pm.Namespace != ns:
		p.Addf(f+"namespace", "%q differs from the namespace of identity.spiffeID (%q); Istio labels source_workload_namespace from the certificate, so telemetry would show %q anyway: remove namespace or set it to %q", pm.Namespace, ns, ns, ns)
	}
	for _, v := range []struct{ field, value string }{
		{"labels.app", pm.Labels.App},
		{"labels.version", pm.Labels.Version},
		{"canonicalService", pm.CanonicalService},
		{"canonicalRevision", pm.CanonicalRevision},
		{"clusterID", pm.ClusterID},
	} {
		if len(validation.IsValidLabelValue(v.value)) > 0 {
			p.Addf(f+v.field, "%q is not a valid Kubernetes label value, as Istio's telemetry labels need: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", v.value)
		}
	}
}

package config

import (
	"strings"
	"testing"
)

const peerBase = `
gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/legacy/sa/vm-fleet
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
`

func TestPeerMetadataDefaults(t *testing.T) {
	c, err := Parse("c.yaml", []byte(peerBase))
	if err != nil {
		t.Fatal(err)
	}
	want := PeerMetadata{WorkloadName: "vm-fleet", Namespace: "legacy", CanonicalService: "vm-fleet", CanonicalRevision: "latest"}
	if c.Mesh.PeerMetadata != want {
		t.Errorf("defaults %+v, want %+v (off, named after the service account)", c.Mesh.PeerMetadata, want)
	}
	c, err = Parse("c.yaml", []byte(peerBase+"mesh: {peerMetadata: {enabled: true, labels: {app: billing-vm, version: v3}, clusterID: vms}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want = PeerMetadata{Enabled: true, WorkloadName: "vm-fleet", Namespace: "legacy", Labels: PeerMetadataLabels{App: "billing-vm", Version: "v3"},
		CanonicalService: "billing-vm", CanonicalRevision: "v3", ClusterID: "vms"}
	if c.Mesh.PeerMetadata != want {
		t.Errorf("with labels %+v, want %+v (the canonical service and revision follow app and version)", c.Mesh.PeerMetadata, want)
	}
}

func TestPeerMetadataErrors(t *testing.T) {
	nonIstio := strings.Replace(peerBase, "/ns/legacy/sa/vm-fleet", "/vm/fleet", 1)
	if _, err := Parse("c.yaml", []byte(nonIstio)); err != nil {
		t.Fatalf("off, an identity of another form is fine: %v", err)
	}
	if _, err := Parse("c.yaml", []byte(nonIstio+"mesh: {peerMetadata: {enabled: true, workloadName: fleet, namespace: vms}}\n")); err != nil {
		t.Fatalf("an identity of another form with explicit names: %v", err)
	}
	for _, tc := range []struct{ name, doc, want string }{
		{"no derivable workload", nonIstio + "mesh: {peerMetadata: {enabled: true, namespace: vms}}\n",
			"c.yaml:6: mesh.peerMetadata.workloadName: required: identity.spiffeID is not of Istio's form"},
		{"no derivable namespace", nonIstio + "mesh: {peerMetadata: {enabled: true, workloadName: fleet}}\n",
			"mesh.peerMetadata.namespace: required"},
		{"namespace other than the certificate's", peerBase + "mesh: {peerMetadata: {enabled: true, namespace: payments}}\n",
			`mesh.peerMetadata.namespace: "payments" differs from the namespace of identity.spiffeID ("legacy")`},
		{"bad workload name", peerBase + "mesh: {peerMetadata: {enabled: true, workloadName: Fleet_1}}\n",
			`mesh.peerMetadata.workloadName: "Fleet_1" is not a valid workload name`},
		{"bad label", peerBase + "mesh: {peerMetadata: {enabled: true, labels: {version: \"v 1\"}}}\n",
			`mesh.peerMetadata.labels.version: "v 1" is not a valid Kubernetes label value`},
		{"bad canonical service", peerBase + "mesh: {peerMetadata: {canonicalService: -svc}}\n",
			`mesh.peerMetadata.canonicalService: "-svc" is not a valid Kubernetes label value`},
		{"bad cluster ID", peerBase + "mesh: {peerMetadata: {enabled: true, clusterID: a/b}}\n",
			`mesh.peerMetadata.clusterID: "a/b" is not a valid Kubernetes label value`},
		{"unknown field", peerBase + "mesh: {peerMetadata: {enabled: true, labels: {team: x}}}\n", `unknown field "team"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not contain %q", err, tc.want)
			}
		})
	}
}

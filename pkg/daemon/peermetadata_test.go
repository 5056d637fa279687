package daemon

import (
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

func TestTranslateOptionsPeerMetadata(t *testing.T) {
	doc := `
gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/legacy/sa/vm-fleet
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
`
	cfg, err := config.Parse("c.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if o := TranslateOptions(cfg, nil); o.PeerMetadata != nil {
		t.Errorf("peer metadata is off by default, got %+v", o.PeerMetadata)
	}
	cfg, err = config.Parse("c.yaml", []byte(doc+"mesh: {peerMetadata: {enabled: true, labels: {app: billing, version: v2}, clusterID: vms}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := controlplane.PeerMetadata{WorkloadName: "vm-fleet", Namespace: "legacy", CanonicalService: "billing",
		CanonicalRevision: "v2", App: "billing", Version: "v2", ClusterID: "vms"}
	if o := TranslateOptions(cfg, nil); o.PeerMetadata == nil || *o.PeerMetadata != want {
		t.Errorf("peer metadata %+v, want %+v", o.PeerMetadata, want)
	}
}

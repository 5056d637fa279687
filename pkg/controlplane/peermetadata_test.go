package controlplane

import (
	"encoding/base64"
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// decodeAsIstio decodes x-envoy-peer-metadata as Istio's inbound peer_metadata filter does
// (meshtest.DecodePeerMetadata: Base64::decodeWithoutPadding, Struct::ParseFromString, then
// convertStructToWorkloadMetadata's field names), independently of the code under test.
func decodeAsIstio(t *testing.T, value string) meshtest.PeerWorkload {
	t.Helper()
	p, err := meshtest.DecodePeerMetadata(value)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var fleetPeer = PeerMetadata{WorkloadName: "vm-fleet", Namespace: "legacy", CanonicalService: "billing-vm",
	CanonicalRevision: "v3", App: "billing-vm", Version: "v3", ClusterID: "vms"}

func TestPeerMetadataDecodesAsIstioDoes(t *testing.T) {
	id, value, err := fleetPeer.Headers()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := base64.StdEncoding.DecodeString(value); err != nil {
		t.Errorf("value is not padded standard base64 (Envoy's Base64::encode): %v", err)
	}
	p := decodeAsIstio(t, value)
	want := meshtest.PeerWorkload{Instance: p.Instance, Namespace: "legacy", Workload: "vm-fleet", Cluster: "vms",
		CanonicalService: "billing-vm", CanonicalRevision: "v3", App: "billing-vm", Version: "v3"}
	if !strings.HasPrefix(p.Instance, "vm-fleet-") || len(p.Instance) != len("vm-fleet-")+10 {
		t.Errorf("NAME %q, want vm-fleet-<10 hex>", p.Instance)
	}
	if p.Owner != "" || len(p.Ignored) > 0 || p.Namespace != want.Namespace || p.Workload != want.Workload || p.Cluster != want.Cluster ||
		p.CanonicalService != want.CanonicalService || p.CanonicalRevision != want.CanonicalRevision || p.App != want.App || p.Version != want.Version {
		t.Errorf("Istio reads %+v, want %+v", p, want)
	}
	// Istio's node id: TYPE~IP~POD.NS~NS.svc.cluster.local; the pod part is NAME.
	parts := strings.Split(id, "~")
	if len(parts) != 4 || parts[0] != "sidecar" || parts[1] != "0.0.0.0" || parts[2] != p.Instance+".legacy" || parts[3] != "legacy.svc.cluster.local" {
		t.Errorf("id %q, want sidecar~0.0.0.0~%s.legacy~legacy.svc.cluster.local", id, p.Instance)
	}
	// Deterministic (sorted keys), so every instance sends the same bytes.
	raw, err := base64.StdEncoding.DecodeString(value)
	if err != nil || len(raw) == 0 {
		t.Fatalf("metadata value %q: %v", value, err)
	}
	var st structpb.Struct
	if err := proto.Unmarshal(raw, &st); err != nil {
		t.Fatal(err)
	}
	again, err := proto.MarshalOptions{Deterministic: true}.Marshal(&st)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(raw) {
		t.Error("the Struct is not serialized deterministically")
	}
	if id2, value2, _ := fleetPeer.Headers(); id2 != id || value2 != value {
		t.Error("the same metadata gave other headers")
	}
}

// A sidecar caches decoded peers by the id for as long as it runs: any change to the metadata
// must change the id.
func TestPeerMetadataIDFollowsTheMetadata(t *testing.T) {
	id, _, _ := fleetPeer.Headers()
	seen := map[string]string{id: "base"}
	for name, edit := range map[string]func(*PeerMetadata){
		"version":            func(p *PeerMetadata) { p.Version = "v4" },
		"canonical revision": func(p *PeerMetadata) { p.CanonicalRevision = "v4" },
		"cluster":            func(p *PeerMetadata) { p.ClusterID = "" },
		"app":                func(p *PeerMetadata) { p.App = "" },
	} {
		p := fleetPeer
		edit(&p)
		got, _, err := p.Headers()
		if err != nil {
			t.Fatal(err)
		}
		if prev, dup := seen[got]; dup {
			t.Errorf("%s: the id %q is the one of %s", name, got, prev)
		}
		seen[got] = name
	}
	minimal := PeerMetadata{WorkloadName: "fwdproxy", Namespace: "fwdproxy"}
	_, value, err := minimal.Headers()
	if err != nil {
		t.Fatal(err)
	}
	if p := decodeAsIstio(t, value); p.Cluster != "" || p.App != "" || p.Version != "" || p.CanonicalService != "" || len(p.Ignored) > 0 {
		t.Errorf("unset fields were sent: %+v", p)
	}
	if _, _, err := (PeerMetadata{Namespace: "x"}).Headers(); err == nil {
		t.Error("metadata without a workload name accepted")
	}
}

// With peer metadata, every HTTP route configuration adds the two headers, overwriting, after
// listing them in internal_only_headers (so a VM's copies are removed first), and removes the
// sidecar's from responses; without it nothing is added.
func TestTranslatePeerMetadata(t *testing.T) {
	cat, opts := loadGolden(t, "testdata/in/bookinfo.yaml")
	off, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range off.Routes {
		if len(r.RequestHeadersToAdd) > 0 || len(r.ResponseHeadersToRemove) > 0 {
			t.Errorf("route %s: headers changed without peer metadata", r.Name)
		}
	}
	pm := fleetPeer
	opts.PeerMetadata = &pm
	on, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewSnapshot(on, nil); err != nil {
		t.Fatalf("snapshot invalid: %v", err)
	}
	id, value, _ := fleetPeer.Headers()
	if len(on.Routes) != len(off.Routes) || len(on.Routes) == 0 {
		t.Fatalf("%d routes with, %d without", len(on.Routes), len(off.Routes))
	}
	for _, r := range on.Routes {
		got := map[string]string{}
		for _, h := range r.RequestHeadersToAdd {
			//lint:ignore SA1019 the deprecated field must stay unset
			if h.AppendAction != core.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD || h.Append != nil || h.KeepEmptyValue {
				t.Errorf("route %s: %s added with %v", r.Name, h.Header.Key, h)
			}
			got[h.Header.Key] = h.Header.Value
		}
		if len(got) != 2 || got["x-envoy-peer-metadata-id"] != id || got["x-envoy-peer-metadata"] != value {
			t.Errorf("route %s adds %v", r.Name, got)
		}
		if strings.Join(r.InternalOnlyHeaders, ",") != "x-envoy-peer-metadata,x-envoy-peer-metadata-id" {
			t.Errorf("route %s: internal_only_headers %v", r.Name, r.InternalOnlyHeaders)
		}
		if strings.Join(r.ResponseHeadersToRemove, ",") != "x-envoy-peer-metadata-id,x-envoy-peer-metadata" {
			t.Errorf("route %s: response_headers_to_remove %v", r.Name, r.ResponseHeadersToRemove)
		}
		for _, vh := range r.VirtualHosts {
			if len(vh.RequestHeadersToAdd) > 0 || len(vh.Routes[0].RequestHeadersToAdd) > 0 {
				t.Errorf("route %s: headers added below the route configuration", r.Name)
			}
		}
	}
	if len(on.Listeners) != len(off.Listeners) || len(on.Clusters) != len(off.Clusters) {
		t.Error("peer metadata changed listeners or clusters")
	}
	for i := range on.Listeners {
		if !proto.Equal(on.Listeners[i], off.Listeners[i]) {
			t.Errorf("listener %s changed", on.Listeners[i].Name)
		}
	}
	opts.PeerMetadata = &PeerMetadata{Namespace: "legacy"}
	if _, err := Translate(cat, opts); err == nil {
		t.Error("peer metadata without a workload name translated")
	}
}

package controlplane

import (
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/fwdproxy/fwdproxy/internal/xdslimit"
)

// A snapshot whose response of one type would not fit in one xDS message is refused when built,
// so no data plane is ever sent a configuration it cannot receive; the one that fits is built.
func TestSnapshotOverTheMessageLimitIsRefused(t *testing.T) {
	res, err := Translate(largeCatalog(300), benchOptions())
	if err != nil {
		t.Fatal(err)
	}
	b := Builder{MaxMessageBytes: 200 << 10}
	_, err = b.Build(res, nil)
	if err == nil || !strings.Contains(err.Error(), "cluster response") || !strings.Contains(err.Error(), "204800-byte limit") {
		t.Fatalf("Build of 600 clusters with a 200 KiB limit: %v; want the cluster response refused", err)
	}
	if _, err := (&Builder{MaxMessageBytes: 10 << 20}).Build(res, nil); err != nil {
		t.Fatalf("with a 10 MiB limit: %v", err)
	}
	if got := (&Builder{}).maxMessageBytes(); got != xdslimit.MaxMessageBytes {
		t.Fatalf("default limit %d, want xdslimit.MaxMessageBytes", got)
	}
}

// Envoy is told the same limit the snapshots are built to.
func TestBootstrapStatesTheMessageLimit(t *testing.T) {
	b, err := Bootstrap(BootstrapOptions{NodeID: "n", NodeCluster: "fwdproxy", XDSSocket: "/run/fwdproxy/xds.sock", AdminAddress: "127.0.0.1:15000"})
	if err != nil {
		t.Fatal(err)
	}
	g := b.GetDynamicResources().GetAdsConfig().GetGrpcServices()[0].GetEnvoyGrpc()
	if got := g.GetMaxReceiveMessageLength().GetValue(); got != xdslimit.MaxMessageBytes {
		t.Fatalf("ADS max_receive_message_length %d, want %d", got, xdslimit.MaxMessageBytes)
	}
}

// The builder's estimate of a response is never below the real size of a state-of-the-world or
// delta response carrying those resources.
func TestResponseEstimateBoundsTheRealResponse(t *testing.T) {
	res, err := Translate(largeCatalog(300), benchOptions())
	if err != nil {
		t.Fatal(err)
	}
	estimate := perResponseOverhead
	sotw := &discovery.DiscoveryResponse{VersionInfo: strings.Repeat("f", 16), TypeUrl: resource.ClusterType, Nonce: "12345678",
		ControlPlane: &core.ControlPlane{Identifier: "fwdproxy"}}
	delta := &discovery.DeltaDiscoveryResponse{SystemVersionInfo: strings.Repeat("f", 16), TypeUrl: resource.ClusterType, Nonce: "12345678"}
	for _, c := range res.Clusters {
		raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		estimate += responseBytes(resource.ClusterType, len(raw), c.Name)
		a := &anypb.Any{TypeUrl: resource.ClusterType, Value: raw}
		sotw.Resources = append(sotw.Resources, a)
		delta.Resources = append(delta.Resources, &discovery.Resource{Name: c.Name, Version: strings.Repeat("0", 64), Resource: a})
	}
	if s, d := proto.Size(sotw), proto.Size(delta); s > estimate || d > estimate {
		t.Fatalf("estimate %d bytes, real responses %d (SotW) and %d (delta)", estimate, s, d)
	}
}

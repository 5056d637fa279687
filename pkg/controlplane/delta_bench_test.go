package controlplane

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// BenchmarkDeltaChangeOneOf10kServices measures the control plane's share of a one-service change
// reaching a delta ADS client at 10,000 services (the Envoy benchmark's change: one service's
// identity): from Set to the client holding the changed clusters and endpoints, one stream
// subscribed to every cluster and endpoint as Envoy is. Reported: p50 and p99 per change, and
// the response bytes per change. Translation and the snapshot build are not timed.
func BenchmarkDeltaChangeOneOf10kServices(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, addr := benchServer(ctx, b)

	cat := largeCatalog(10000)
	opts := benchOptions()
	var translator Translator
	var builder Builder
	build := func(i int) *Snapshot {
		cat.Services[1+i%9998].Identities[0] = fmt.Sprintf("spiffe://cluster.local/ns/x/sa/v%d", i)
		res, err := translator.Translate(cat, opts)
		if err != nil {
			b.Fatal(err)
		}
		snap, err := builder.Build(res, nil)
		if err != nil {
			b.Fatal(err)
		}
		return snap
	}
	if err := s.Set(ctx, build(-1)); err != nil {
		b.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		b.Fatal(err)
	}
	node := &core.Node{Id: "bench"}
	// recv takes responses (ACKing each) until both types have answered; it returns their bytes.
	recv := func(want ...string) int {
		bytes := 0
		for len(want) > 0 {
			r, err := stream.Recv()
			if err != nil {
				b.Fatal(err)
			}
			for _, res := range r.GetResources() {
				bytes += len(res.GetResource().GetValue())
			}
			want = slices.DeleteFunc(want, func(t string) bool { return t == r.GetTypeUrl() })
			if err := stream.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce()}); err != nil {
				b.Fatal(err)
			}
		}
		return bytes
	}
	for _, typ := range []string{resource.ClusterType, resource.EndpointType} {
		if err := stream.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			b.Fatal(err)
		}
	}
	recv(resource.ClusterType, resource.EndpointType)
	var took []time.Duration
	bytes := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		snap := build(i)
		b.StartTimer()
		t0 := time.Now()
		if err := s.Set(ctx, snap); err != nil {
			b.Fatal(err)
		}
		bytes += recv(resource.ClusterType, resource.EndpointType)
		took = append(took, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(took[(len(took)*99)/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(bytes)/float64(b.N), "bytes/change")
}

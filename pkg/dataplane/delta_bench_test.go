package dataplane

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// scaleCatalog is n services with two ports each, as the control plane's benchmark catalog: a
// shared HTTP port routed by Host and a TCP port of their own (n+1 listeners, 2n clusters).
func scaleCatalog(n int, httpPort uint32) *catalog.Catalog {
	c := &catalog.Catalog{}
	for i := range n {
		c.Services = append(c.Services, catalog.Service{
			Host:       fmt.Sprintf("svc-%05d.ns-%03d.svc.cluster.local", i, i%100),
			Ports:      []catalog.Port{{Number: httpPort, Protocol: catalog.HTTP}, {Number: uint32(20000 + i), Protocol: catalog.TCP}},
			Identities: []string{fmt.Sprintf("spiffe://cluster.local/ns/ns-%03d/sa/svc-%05d", i%100, i)},
		})
	}
	c.Normalize()
	return c
}

// scaleResources translates scaleCatalog(n) for a data plane on loopback. Each TCP listener gets
// an address of its own in 127.77.0.0/16 on one free port, so n listeners bind without looking
// for n free ports (and no other test uses those addresses).
func scaleResources(tb testing.TB, n int) *controlplane.Resources {
	tb.Helper()
	httpPort, tcpPort := freePort(tb), freePort(tb)
	res, err := controlplane.Translate(scaleCatalog(n, httpPort), controlplane.Options{
		ListenAddress: "127.0.0.1", ConnectTimeout: 5 * time.Second,
		Gateways: []controlplane.Gateway{{Name: "eastwest", Addresses: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15443")}}},
	})
	if err != nil {
		tb.Fatal(err)
	}
	i := 0
	for _, l := range res.Listeners {
		sa := l.GetAddress().GetSocketAddress()
		if sa.GetPortValue() == httpPort {
			continue
		}
		sa.Address = fmt.Sprintf("127.77.%d.%d", i/250, i%250+1)
		sa.PortSpecifier = &core.SocketAddress_PortValue{PortValue: tcpPort}
		i++
	}
	return res
}

// deltaResponse is a delta response of one type carrying msgs, each at version v.
func deltaResponse(tb testing.TB, typeURL, v string, msgs ...proto.Message) *discoverypb.DeltaDiscoveryResponse {
	tb.Helper()
	resp := &discoverypb.DeltaDiscoveryResponse{TypeUrl: typeURL, SystemVersionInfo: v, Nonce: v}
	for _, m := range msgs {
		a, err := anypb.New(m)
		if err != nil {
			tb.Fatal(err)
		}
		var name string
		switch r := m.(type) {
		case interface{ GetClusterName() string }: // ClusterLoadAssignment
			name = r.GetClusterName()
		case interface{ GetName() string }:
			name = r.GetName()
		}
		resp.Resources = append(resp.Resources, &discoverypb.Resource{Name: name, Version: v, Resource: a})
	}
	return resp
}

func msgsOf[T proto.Message](ts []T) []proto.Message {
	out := make([]proto.Message, len(ts))
	for i, t := range ts {
		out[i] = t
	}
	return out
}

// applyAll applies a whole configuration as the first responses of a stream would.
func applyAll(tb testing.TB, dp *DataPlane, res *controlplane.Resources, v string) {
	tb.Helper()
	for _, step := range []struct {
		typeURL string
		msgs    []proto.Message
	}{
		{resource.ClusterType, msgsOf(res.Clusters)},
		{resource.EndpointType, msgsOf(res.Endpoints)},
		{resource.ListenerType, msgsOf(res.Listeners)},
		{resource.RouteType, msgsOf(res.Routes)},
	} {
		if err := dp.applyDelta(dp.subs[step.typeURL], deltaResponse(tb, step.typeURL, v, step.msgs...)); err != nil {
			tb.Fatal(err)
		}
		dp.resubscribe(step.typeURL)
	}
	dp.updateReady()
}

// BenchmarkDeltaOneChange10kServices measures what one delta response costs the data plane at
// 10,000 services x 2 ports (10,001 listeners bound, 20,000 clusters): one changed cluster, and
// one changed listener, each applied with the resubscription and readiness that follow every
// response. "full" applies the whole cluster set anew, for the ratio.
//
//	go test -run '^$' -bench DeltaOneChange10k -benchmem ./pkg/dataplane/
func BenchmarkDeltaOneChange10kServices(b *testing.B) {
	dp := New(Options{DrainTime: time.Millisecond, MaxConnections: -1})
	b.Cleanup(dp.shutdown)
	res := scaleResources(b, 10000)
	applyAll(b, dp, res, "v0")
	if len(dp.listeners) != 10001 || len(*dp.clusters.Load()) != 20000 {
		b.Fatalf("%d listeners, %d clusters applied", len(dp.listeners), len(*dp.clusters.Load()))
	}
	step := func(b *testing.B, typeURL, v string, m proto.Message) {
		if err := dp.applyDelta(dp.subs[typeURL], deltaResponse(b, typeURL, v, m)); err != nil {
			b.Fatal(err)
		}
		dp.resubscribe(typeURL)
		dp.updateReady()
	}
	b.Run("cluster", func(b *testing.B) {
		orig := res.Clusters[4321]
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			c := proto.Clone(orig).(*clusterpb.Cluster)
			c.ConnectTimeout = durationpb.New(time.Second + time.Duration(i%1000)*time.Millisecond)
			step(b, resource.ClusterType, fmt.Sprintf("c%d", i), c)
		}
	})
	b.Run("listener", func(b *testing.B) {
		orig := res.Listeners[4321]
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			l := proto.Clone(orig).(*listener.Listener)
			l.StatPrefix = fmt.Sprintf("changed_%d", i)
			step(b, resource.ListenerType, fmt.Sprintf("l%d", i), l)
		}
	})
	b.Run("full", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			v := fmt.Sprintf("f%d", i)
			msgs := make([]proto.Message, len(res.Clusters))
			for j, c := range res.Clusters {
				c := proto.Clone(c).(*clusterpb.Cluster)
				c.ConnectTimeout = durationpb.New(time.Second + time.Duration(i%1000)*time.Millisecond)
				msgs[j] = c
			}
			b.StopTimer() // the response is the control plane's work
			resp := deltaResponse(b, resource.ClusterType, v, msgs...)
			b.StartTimer()
			if err := dp.applyDelta(dp.subs[resource.ClusterType], resp); err != nil {
				b.Fatal(err)
			}
			dp.resubscribe(resource.ClusterType)
			dp.updateReady()
		}
	})
}

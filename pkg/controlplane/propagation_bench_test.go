package controlplane

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	client "github.com/envoyproxy/go-control-plane/pkg/client/sotw/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// BenchmarkPropagation100Clients measures a catalog change reaching 100 connected xDS clients:
// from Set to each client's receipt of the new clusters (which it then ACKs). Reported as p50 and
// p99 over all clients and iterations. The catalog has 1,000 services x 2 ports.
func BenchmarkPropagation100Clients(b *testing.B) {
	const clients = 100
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, addr := benchServer(ctx, b)

	cat := largeCatalog(1000)
	opts := benchOptions()
	var builder Builder
	build := func(i int) *Snapshot {
		cat.Services[0].Identities = []string{fmt.Sprintf("spiffe://cluster.local/ns/x/sa/v%d", i)}
		res, err := Translate(cat, opts)
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

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	received := make(chan time.Time, clients)
	var ready sync.WaitGroup
	for i := 0; i < clients; i++ {
		c := client.NewADSClient(ctx, &core.Node{Id: fmt.Sprintf("client-%d", i)}, resource.ClusterType)
		if err := c.InitConnect(conn); err != nil {
			b.Fatal(err)
		}
		ready.Add(1)
		go func() {
			first := true
			for {
				if _, err := c.Fetch(); err != nil {
					return
				}
				_ = c.Ack()
				if first {
					first = false
					ready.Done()
					continue
				}
				received <- time.Now()
			}
		}()
	}
	ready.Wait()

	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		snap := build(i)
		start := time.Now()
		if err := s.Set(ctx, snap); err != nil {
			b.Fatal(err)
		}
		for j := 0; j < clients; j++ {
			select {
			case t := <-received:
				lat = append(lat, t.Sub(start))
			case <-time.After(30 * time.Second):
				b.Fatal("a client did not receive the change within 30s")
			}
		}
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

// benchServer serves xDS on a loopback port until ctx ends.
func benchServer(ctx context.Context, b *testing.B) (*Server, string) {
	s := NewServer(slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(ctx, lis, insecure.NewCredentials())
	return s, lis.Addr().String()
}

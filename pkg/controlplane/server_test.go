package controlplane

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	client "github.com/envoyproxy/go-control-plane/pkg/client/sotw/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

type testServer struct {
	*Server
	addr string
	reg  *prometheus.Registry
	stop context.CancelFunc
	done chan struct{}
}

func startServer(t *testing.T) *testServer {
	t.Helper()
	reg := prometheus.NewRegistry()
	s := NewServer(slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{Server: s, addr: lis.Addr().String(), reg: reg, stop: cancel, done: make(chan struct{})}
	go func() { defer close(ts.done); _ = s.Serve(ctx, lis, insecure.NewCredentials()) }()
	t.Cleanup(func() { cancel(); <-ts.done })
	return ts
}

func testBundle(t *testing.T, ca *meshtest.CA) *identity.Bundle {
	t.Helper()
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, err := identity.New("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", leaf.ChainPEM, leaf.KeyPEM, ca.RootPEM, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func snapshotFor(t *testing.T, golden string, bundle *identity.Bundle, mutate func(*Resources)) *Snapshot {
	t.Helper()
	cat, opts := loadGolden(t, golden)
	res, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if mutate != nil {
		mutate(res)
	}
	snap, err := NewSnapshot(res, bundle)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

type adsConn struct {
	conn   *grpc.ClientConn
	client client.ADSClient
}

func dial(t *testing.T, addr, typeURL string) *adsConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	c := client.NewADSClient(ctx, &core.Node{Id: "envoy-test", Cluster: "fwdproxy"}, typeURL)
	if err := c.InitConnect(conn); err != nil {
		t.Fatal(err)
	}
	return &adsConn{conn: conn, client: c}
}

// fetch waits for the next response, failing the test after a bounded wait.
func fetch(t *testing.T, c client.ADSClient) *client.Response {
	t.Helper()
	type result struct {
		r   *client.Response
		err error
	}
	ch := make(chan result, 1)
	go func() { r, err := c.Fetch(); ch <- result{r, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("fetch: %v", r.err)
		}
		return r.r
	case <-time.After(10 * time.Second):
		t.Fatal("no xDS response within 10s")
	}
	return nil
}

func clusterNames(t *testing.T, r *client.Response) []string {
	var names []string
	for _, a := range r.Resources {
		c := &cluster.Cluster{}
		if err := a.UnmarshalTo(c); err != nil {
			t.Fatal(err)
		}
		names = append(names, c.Name)
	}
	return names
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	meshtest.Eventually(t, 10*time.Second, what, cond)
}

func TestADSFullConfigUpdateAckNackReconnect(t *testing.T) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	bundle := testBundle(t, ca)
	s := startServer(t)
	first := snapshotFor(t, "testdata/in/minimal-tcp.yaml", bundle, nil)
	if err := s.Set(context.Background(), first); err != nil {
		t.Fatal(err)
	}

	// Full config on connect.
	cds := dial(t, s.addr, resource.ClusterType)
	lds := dial(t, s.addr, resource.ListenerType)
	got := clusterNames(t, fetch(t, cds.client))
	if len(got) != 1 || got[0] != "outbound|6379||redis.cache.svc.cluster.local" {
		t.Fatalf("clusters on connect: %v", got)
	}
	if r := fetch(t, lds.client); len(r.Resources) != 1 {
		t.Fatalf("listeners on connect: %d", len(r.Resources))
	}
	if err := cds.client.Ack(); err != nil {
		t.Fatal(err)
	}
	if err := lds.client.Ack(); err != nil {
		t.Fatal(err)
	}
	// Listeners and clusters alone do not make a data plane current: it needs the secrets too.
	waitFor(t, "the listener and cluster ACKs recorded", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		n := 0
		for _, st := range s.streams {
			n += len(st.acked)
		}
		return n == 2
	})
	if st := s.Status(); st.AckedCurrent != 0 || st.AckedAny != 0 {
		t.Fatalf("counted as current without secrets: %+v", st)
	}
	sds := dial(t, s.addr, resource.SecretType)
	fetch(t, sds.client)
	if err := sds.client.Ack(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "ACK of the current snapshot", func() bool { return s.Status().AckedCurrent >= 1 })

	// Update on catalog change.
	second := snapshotFor(t, "testdata/in/bookinfo.yaml", bundle, nil)
	if err := s.Set(context.Background(), second); err != nil {
		t.Fatal(err)
	}
	got = clusterNames(t, fetch(t, cds.client))
	if len(got) != 5 {
		t.Fatalf("clusters after update: %v", got)
	}

	// NACK: counted, logged, and the client is not counted as running the current config.
	if err := cds.client.Nack("unknown field in cluster outbound|9080||x"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "NACK metric", func() bool {
		return testutil.ToFloat64(s.metrics.nacks.WithLabelValues("cluster")) == 1
	})
	if st := s.Status(); st.AckedCurrent != 0 {
		t.Fatalf("a NACKing client counted as current: %+v", st)
	}

	// Reconnect: a new stream gets the full current config at once.
	cds.conn.Close()
	waitFor(t, "stream close", func() bool { return s.Status().Clients == 2 })
	again := dial(t, s.addr, resource.ClusterType)
	if got := clusterNames(t, fetch(t, again.client)); len(got) != 5 {
		t.Fatalf("clusters after reconnect: %v", got)
	}
	if n := testutil.ToFloat64(s.metrics.pushes.WithLabelValues("cluster")); n < 3 {
		t.Fatalf("cluster pushes metric = %v", n)
	}
}

func TestSDSSecretRotation(t *testing.T) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t)
	b1 := testBundle(t, ca)
	if err := s.Set(context.Background(), snapshotFor(t, "testdata/in/minimal-tcp.yaml", b1, nil)); err != nil {
		t.Fatal(err)
	}
	sds := dial(t, s.addr, resource.SecretType)
	chainOf := func(r *client.Response) string {
		for _, a := range r.Resources {
			sec := &tlsv3.Secret{}
			if err := a.UnmarshalTo(sec); err != nil {
				t.Fatal(err)
			}
			if sec.Name == SecretCertificate {
				return string(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			}
		}
		t.Fatal("no default secret")
		return ""
	}
	r := fetch(t, sds.client)
	if len(r.Resources) != 2 || chainOf(r) != string(b1.CertChainPEM) {
		t.Fatalf("first secrets: %d resources", len(r.Resources))
	}
	_ = sds.client.Ack()
	b2 := testBundle(t, ca)
	snap2 := snapshotFor(t, "testdata/in/minimal-tcp.yaml", b2, nil)
	if err := s.Set(context.Background(), snap2); err != nil {
		t.Fatal(err)
	}
	if chainOf(fetch(t, sds.client)) != string(b2.CertChainPEM) {
		t.Fatal("rotated certificate not pushed")
	}
	if snap2.ConfigVersion != s.Current().ConfigVersion || snap2.SecretsVersion == "" {
		t.Fatal("versions not tracked")
	}
}

// TestDeltaADS checks the incremental protocol on the same server.
func TestDeltaADS(t *testing.T) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t)
	if err := s.Set(context.Background(), snapshotFor(t, "testdata/in/bookinfo.yaml", testBundle(t, ca), nil)); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: "delta"}, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Resources) != 5 {
		t.Fatalf("delta clusters: %d", len(resp.Resources))
	}
	var names []string
	for _, r := range resp.Resources {
		names = append(names, r.Name)
	}
	if !strings.Contains(strings.Join(names, " "), "outbound|9080|v2|reviews.bookinfo.svc.cluster.local") {
		t.Fatalf("delta names: %v", names)
	}
	// ACK by nonce.
	if err := stream.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType, ResponseNonce: resp.Nonce}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "delta ACK recorded", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, st := range s.streams {
			if st.acked[resource.ClusterType] == s.current.Cache.GetVersion(resource.ClusterType) {
				return true
			}
		}
		return false
	})
}

// TestNACKDoesNotLoop checks that a rejected version is not sent again (a client would reject it
// again, forever); the next change is.
func TestNACKDoesNotLoop(t *testing.T) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	bundle := testBundle(t, ca)
	s := startServer(t)
	if err := s.Set(context.Background(), snapshotFor(t, "testdata/in/minimal-tcp.yaml", bundle, nil)); err != nil {
		t.Fatal(err)
	}
	cds := dial(t, s.addr, resource.ClusterType)
	fetch(t, cds.client)
	if err := cds.client.Nack("rejected for the test"); err != nil {
		t.Fatal(err)
	}
	got := make(chan *client.Response, 1)
	go func() {
		r, err := cds.client.Fetch()
		if err == nil {
			got <- r
		}
	}()
	// Once the NACK is handled, the next response must be the next version (5 clusters), not the
	// rejected one (1) again.
	waitFor(t, "the NACK counted", func() bool { return testutil.ToFloat64(s.metrics.nacks.WithLabelValues("cluster")) == 1 })
	if err := s.Set(context.Background(), snapshotFor(t, "testdata/in/bookinfo.yaml", bundle, nil)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-got:
		if len(r.Resources) != 5 {
			t.Fatalf("next version has %d clusters", len(r.Resources))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the next version was not sent after a NACK")
	}
}

// A client that NACKs over and over (here 100 times the same response) is counted every time
// but logged only a few times a minute.
func TestRepeatedNACKsAreCountedAndRateLimited(t *testing.T) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	bundle := testBundle(t, ca)
	logs := &meshtest.SyncBuffer{}
	reg := prometheus.NewRegistry()
	s := NewServer(slog.New(slog.NewTextHandler(logs, nil)), reg)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ctx, lis, insecure.NewCredentials()) }()
	t.Cleanup(func() { cancel(); <-done })
	if err := s.Set(context.Background(), snapshotFor(t, "testdata/in/minimal-tcp.yaml", bundle, nil)); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "nacker"}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType, ResponseNonce: resp.GetNonce(),
			ErrorDetail: &statuspb.Status{Code: 3, Message: "rejected by the test"}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "100 NACKs counted", func() bool { return testutil.ToFloat64(s.metrics.nacks.WithLabelValues("cluster")) == 100 })
	if n := strings.Count(logs.String(), "rejected configuration"); n == 0 || n > 10 {
		t.Errorf("100 NACKs logged %d times; want a few", n)
	}
}

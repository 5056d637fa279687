package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	client "github.com/envoyproxy/go-control-plane/pkg/client/sotw/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// transports serves one Server in process, on a Unix socket and on TCP with client
// certificates, as the daemon does.
type transports struct {
	s      *Server
	inproc *InProcessListener
	socket string
	tcp    string
	ca     *meshtest.CA
	logs   *meshtest.SyncBuffer
}

func startTransports(t *testing.T) *transports {
	t.Helper()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	logs := &meshtest.SyncBuffer{}
	tr := &transports{s: NewServer(slog.New(slog.NewTextHandler(logs, nil)), prometheus.NewRegistry()),
		inproc: NewInProcessListener(), socket: filepath.Join(t.TempDir(), "xds.sock"), ca: ca, logs: logs}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 3)
	t.Cleanup(func() {
		cancel()
		for range 3 {
			<-done
		}
	})
	go func() { _ = tr.s.ServeInProcess(ctx, tr.inproc); done <- struct{}{} }()
	ul, err := localsock.Listen(tr.socket, -1)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = tr.s.ServeUnix(ctx, ul, localsock.Policy{UID: uint32(os.Geteuid()), GID: -1, Field: "xds.group"})
		done <- struct{}{}
	}()
	server, err := ca.IssueWithDNS("spiffe://cluster.local/ns/fwdproxy/sa/xds", []string{"localhost"}, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(server.ChainPEM, server.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.RootPEM)
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tr.tcp = tl.Addr().String()
	go func() {
		_ = tr.s.ServeTLS(ctx, tl, &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, MinVersion: tls.VersionTLS12})
		done <- struct{}{}
	}()
	bundle := testBundle(t, ca)
	if err := tr.s.Set(context.Background(), snapshotFor(t, "testdata/in/minimal-tcp.yaml", bundle, nil)); err != nil {
		t.Fatal(err)
	}
	return tr
}

// client opens an ADS stream as node over conn, for typeURL.
func adsOn(t *testing.T, conn *grpc.ClientConn, node, typeURL string) client.ADSClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	c := client.NewADSClient(ctx, &core.Node{Id: node, Cluster: "fwdproxy"}, typeURL)
	if err := c.InitConnect(conn); err != nil {
		t.Fatal(err)
	}
	return c
}

func (tr *transports) inProcess(t *testing.T) *grpc.ClientConn {
	conn, err := grpc.NewClient("passthrough:///in-process", grpc.WithContextDialer(tr.inproc.Dial), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

func (tr *transports) unix(t *testing.T) *grpc.ClientConn {
	conn, err := grpc.NewClient("unix:"+tr.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

func (tr *transports) tls(t *testing.T, withCert bool) *grpc.ClientConn {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(tr.ca.RootPEM)
	cfg := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if withCert {
		leaf, err := tr.ca.IssueFor("spiffe://cluster.local/ns/laptops/sa/dataplane", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		cert, _ := tls.X509KeyPair(leaf.ChainPEM, leaf.KeyPEM)
		cfg.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(tr.tcp, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// ackAll subscribes node over conn to clusters, listeners and secrets and ACKs (or NACKs) them.
func ackAll(t *testing.T, conn func(*testing.T) *grpc.ClientConn, node, nack string) {
	t.Helper()
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.SecretType} {
		c := adsOn(t, conn(t), node, typ)
		fetch(t, c)
		var err error
		if nack != "" && typ == resource.ListenerType {
			err = c.Nack(nack)
		} else {
			err = c.Ack()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestOnlyTheDataPlaneCounts: clients that are not this instance's data plane (another node ID,
// or the right node ID over another transport) are served, but neither make the instance
// current nor raise fwdproxy_xds_nacks_total; their NACKs are counted apart.
func TestOnlyTheDataPlaneCounts(t *testing.T) {
	tr := startTransports(t)
	tr.s.SetDataPlane(func(c Client) bool { return c.Peer.Transport == InProcess && c.Node == "node-a" })
	nacks := func() float64 { return testutil.ToFloat64(tr.s.metrics.nacks.WithLabelValues("listener")) }
	foreign := func() float64 { return testutil.ToFloat64(tr.s.metrics.foreignNacks.WithLabelValues("listener")) }

	ackAll(t, tr.unix, "node-a", "")                                                        // the right node ID on the socket
	ackAll(t, tr.inProcess, "node-b", "")                                                   // another node in process
	ackAll(t, func(t *testing.T) *grpc.ClientConn { return tr.tls(t, true) }, "node-a", "") // TCP
	ackAll(t, tr.unix, "intruder", "rejected by the intruder")
	waitFor(t, "the foreign NACK", func() bool { return foreign() == 1 })
	if st := tr.s.Status(); st.AckedAny != 0 || st.AckedCurrent != 0 || st.Clients != 12 {
		t.Fatalf("status with only foreign clients: %+v", st)
	}
	if nacks() != 0 {
		t.Fatal("a foreign client's NACK raised fwdproxy_xds_nacks_total")
	}
	if logs := tr.logs.String(); !strings.Contains(logs, "level=WARN msg=\"xDS client that is not this instance's data plane rejected configuration\" node=intruder peer=\"unix uid 0") ||
		strings.Contains(logs, "level=ERROR") {
		t.Fatalf("log:\n%s", logs)
	}

	ackAll(t, tr.inProcess, "node-a", "")
	waitFor(t, "the data plane's ACK", func() bool { return tr.s.Status().AckedCurrent == 1 })
	if st := tr.s.Status(); st.AckedAny != 1 {
		t.Fatalf("status with the data plane: %+v", st)
	}
	ackAll(t, tr.inProcess, "node-a", "rejected by the data plane")
	waitFor(t, "the data plane's NACK", func() bool { return nacks() == 1 })
	if !strings.Contains(tr.logs.String(), "level=ERROR msg=\"xDS client rejected configuration; it keeps its last good one\" node=node-a") {
		t.Fatalf("log:\n%s", tr.logs.String())
	}
}

// TestTCPNeedsAClientCertificate: on TCP the server answers only clients with a certificate
// from the configured CA, and knows them by it.
func TestTCPNeedsAClientCertificate(t *testing.T) {
	tr := startTransports(t)
	conn := tr.tls(t, false)
	defer conn.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := client.NewADSClient(ctx, &core.Node{Id: "anonymous"}, resource.SecretType)
	if err := c.InitConnect(conn); err == nil {
		r, err := c.Fetch()
		if err == nil {
			t.Fatalf("a TCP client without a certificate got %d secrets", len(r.Resources))
		}
	}
	withCert := adsOn(t, tr.tls(t, true), "laptop", resource.SecretType)
	if r := fetch(t, withCert); len(r.Resources) != 2 {
		t.Fatalf("a TCP client with a certificate got %d secrets", len(r.Resources))
	}
	var peers []string
	tr.s.mu.Lock()
	for _, st := range tr.s.streams {
		peers = append(peers, st.peer.String())
	}
	tr.s.mu.Unlock()
	if len(peers) != 1 || !strings.Contains(peers[0], "tcp 127.0.0.1:") || !strings.HasSuffix(peers[0], " spiffe://cluster.local/ns/laptops/sa/dataplane") {
		t.Fatalf("peers %q", peers)
	}
	if err := (&Server{}).ServeTLS(ctx, nil, &tls.Config{}); err == nil || !strings.Contains(err.Error(), "must require client certificates") {
		t.Fatalf("TLS without client certificates: %v", err)
	}
}

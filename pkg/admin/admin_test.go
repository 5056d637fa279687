package admin

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

const doc = `services:
  - host: reviews.default.svc.cluster.local
    ports: [{number: 9080, protocol: http}]
    identities: [spiffe://cluster.local/ns/default/sa/reviews]
`

func startNode(t *testing.T) *peers.Node {
	t.Helper()
	n, err := peers.Start(peers.Config{Name: "admin-test", Bind: "127.0.0.1:0", Profile: "local", CatalogOptions: catalog.Options{Gateways: []string{"gw"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func newServer(fleet Fleet, token string) *Server {
	s := &Server{Token: token, Catalog: catalog.Options{Gateways: []string{"gw"}}, Log: slog.New(slog.DiscardHandler)}
	if fleet != nil {
		s.Fleet = fleet
	}
	s.Status = func() Status {
		return Status{Node: "admin-test", Gossip: fleet != nil, Ready: true, ReadyReason: "ready"}
	}
	return s
}

func TestApplyListDeleteWithToken(t *testing.T) {
	n := startNode(t)
	srv := httptest.NewServer(newServer(n, "s3cret").Handler())
	defer srv.Close()
	ctx := context.Background()

	anon := &Client{BaseURL: srv.URL}
	if _, _, err := anon.Apply(ctx, "svc.yaml", []byte(doc)); err == nil || !strings.Contains(err.Error(), "bearer token") {
		t.Fatalf("without a token: %v", err)
	}
	wrong := &Client{BaseURL: srv.URL, Token: "guess"}
	if _, err := wrong.Status(ctx); err == nil {
		t.Fatal("wrong token accepted")
	}

	c := &Client{BaseURL: srv.URL, Token: "s3cret"}
	applied, changed, err := c.Apply(ctx, "svc.yaml", []byte(doc))
	if err != nil || changed != 1 || len(applied) != 1 || applied[0] != "reviews.default.svc.cluster.local" {
		t.Fatalf("apply: %v %d %v", applied, changed, err)
	}
	if _, changed, _ := c.Apply(ctx, "svc.yaml", []byte(doc)); changed != 0 {
		t.Fatalf("re-applying the same entry changed %d", changed)
	}
	if got := n.OperatorServices(); len(got) != 1 || got[0].Ports[0].Number != 9080 {
		t.Fatalf("store holds %+v", got)
	}
	list, err := c.Services(ctx)
	if err != nil || !strings.Contains(string(list), "reviews.default.svc.cluster.local") {
		t.Fatalf("list: %s %v", list, err)
	}

	// A bad document is refused with the file, line and field, and nothing is written.
	bad := strings.Replace(doc, "spiffe://cluster.local/ns/default/sa/reviews", "reviews", 1)
	bad = strings.Replace(bad, "reviews.default", "ratings.default", 1)
	if _, _, err := c.Apply(ctx, "bad.yaml", []byte(bad)); err == nil || !strings.Contains(err.Error(), "bad.yaml:4: services[0].identities[0]") {
		t.Fatalf("bad entry: %v", err)
	}
	unknownGW := strings.Replace(doc, "identities:", "gateways: [nope]\n    identities:", 1)
	if _, _, err := c.Apply(ctx, "gw.yaml", []byte(unknownGW)); err == nil || !strings.Contains(err.Error(), "gateways") {
		t.Fatalf("unknown gateway: %v", err)
	}
	if len(n.OperatorServices()) != 1 {
		t.Fatal("a refused document changed the store")
	}

	if err := c.Delete(ctx, "reviews.default.svc.cluster.local"); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "reviews.default.svc.cluster.local"); err == nil || !strings.Contains(err.Error(), "no operator entry") {
		t.Fatalf("second delete: %v", err)
	}
	if len(n.OperatorServices()) != 0 {
		t.Fatal("delete did not remove the entry")
	}
}

func TestWithoutGossipApplyExplainsTheFix(t *testing.T) {
	srv := httptest.NewServer(newServer(nil, "").Handler())
	defer srv.Close()
	c := &Client{BaseURL: srv.URL}
	if _, _, err := c.Apply(context.Background(), "svc.yaml", []byte(doc)); err == nil || !strings.Contains(err.Error(), "set peers.bind") {
		t.Fatalf("apply without gossip: %v", err)
	}
	st, err := c.Status(context.Background())
	if err != nil || st.Gossip || st.Node != "admin-test" {
		t.Fatalf("status: %+v %v", st, err)
	}
}

func TestMutualTLS(t *testing.T) {
	ca, err := meshtest.NewCA("admin")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	server, _ := ca.IssueWithDNS("spiffe://cluster.local/ns/fwdproxy/sa/admin", []string{"admin.fwdproxy.test"}, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	sChain, sKey, root, err := server.WriteFiles(dir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	cdir := t.TempDir()
	client, _ := ca.IssueFor("spiffe://cluster.local/ns/ops/sa/operator", time.Hour)
	cChain, cKey, _, err := client.WriteFiles(cdir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	stls, err := ServerTLS(sChain, sKey, root)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(newServer(nil, "").Handler())
	srv.Listener.Close()
	srv.Listener = lis
	srv.TLS = stls
	srv.StartTLS()
	defer srv.Close()

	ctls, err := ClientTLS(cChain, cKey, root)
	if err != nil {
		t.Fatal(err)
	}
	ctls.ServerName = "admin.fwdproxy.test"
	ok := &Client{BaseURL: srv.URL, HTTP: &http.Client{Transport: &http.Transport{TLSClientConfig: ctls}}}
	if _, err := ok.Status(context.Background()); err != nil {
		t.Fatalf("with a client certificate: %v", err)
	}
	nocert, _ := ClientTLS("", "", root)
	nocert.ServerName = "admin.fwdproxy.test"
	anon := &Client{BaseURL: srv.URL, HTTP: &http.Client{Transport: &http.Transport{TLSClientConfig: nocert}}}
	if _, err := anon.Status(context.Background()); err == nil {
		t.Fatal("a client without a certificate was served")
	}
}

// Refused requests (no or a wrong token) and failed TLS handshakes are each counted and logged
// only a few times a minute: whatever reaches the admin port cannot flood the log.
func TestRefusalsAreCountedAndRateLimited(t *testing.T) {
	ca, err := meshtest.NewCA("admin")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	server, _ := ca.IssueWithDNS("spiffe://cluster.local/ns/fwdproxy/sa/admin", []string{"admin.fwdproxy.test"}, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	sChain, sKey, root, err := server.WriteFiles(dir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	stls, err := ServerTLS(sChain, sKey, root)
	if err != nil {
		t.Fatal(err)
	}
	logs := &meshtest.SyncBuffer{}
	s := newServer(nil, "0123456789abcdef")
	s.Log = slog.New(slog.NewTextHandler(logs, nil))
	var mu sync.Mutex
	refused := map[string]int{}
	s.Refused = func(reason string) { mu.Lock(); refused[reason]++; mu.Unlock() }
	count := func(reason string) int { mu.Lock(); defer mu.Unlock(); return refused[reason] }
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tlsLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = s.Serve(ctx, plain) }()
	go func() { _ = s.Serve(ctx, tls.NewListener(tlsLis, stls)) }()

	c := &Client{BaseURL: "http://" + plain.Addr().String(), Token: "wrong"}
	for range 100 {
		if _, err := c.Status(context.Background()); err == nil {
			t.Fatal("a wrong token was accepted")
		}
	}
	for range 50 {
		conn, err := net.Dial("tcp", tlsLis.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")) // plain HTTP to the TLS port
		_, _ = io.ReadAll(conn)
		conn.Close()
	}
	meshtest.Eventually(t, 5*time.Second, "the refusals counted", func() bool { return count("unauthorized") == 100 && count("tls") == 50 })
	if n := strings.Count(logs.String(), "\n"); n > 25 {
		t.Errorf("150 refusals logged %d lines:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "bearer token") || !strings.Contains(logs.String(), "TLS handshake") {
		t.Errorf("the refusals are not logged at all:\n%s", logs.String())
	}
}

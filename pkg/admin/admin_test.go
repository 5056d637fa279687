package admin

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
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
	s := &Server{Local: localsock.Policy{UID: uint32(os.Geteuid()), GID: -1, Field: "admin.group"},
		Catalog: catalog.Options{Gateways: []string{"gw"}}, Log: slog.New(slog.DiscardHandler)}
	if token != "" {
		s.Tokens = []Token{{Name: "ci", Secret: token}}
	}
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
	s := newServer(n, "s3cret")
	logs := &meshtest.SyncBuffer{}
	s.Log = slog.New(slog.NewTextHandler(logs, nil))
	srv := httptest.NewServer(s.Handler())
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
	// The audit log names the token, never its secret.
	if l := logs.String(); !strings.Contains(l, `msg="operator entries applied" services=1 hosts=reviews.default.svc.cluster.local changed=1 principal="token ci" via="tcp 127.0.0.1:`) ||
		!strings.Contains(l, `msg="admin API request refused" method=POST path=/v1/services caller="no valid token"`) || strings.Contains(l, "s3cret") {
		t.Fatalf("audit log:\n%s", l)
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
	c := &Client{Socket: serveSocket(t, newServer(nil, ""), t.TempDir(), -1)}
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
	client, err := ca.IssueFor("spiffe://cluster.local/ns/ops/sa/operator", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
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
	s := newServer(startNode(t), "")
	logs := &meshtest.SyncBuffer{}
	s.Log = slog.New(slog.NewTextHandler(logs, nil))
	srv := httptest.NewUnstartedServer(s.Handler())
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
	if _, _, err := ok.Apply(context.Background(), "svc.yaml", []byte(doc)); err != nil {
		t.Fatalf("apply with a client certificate: %v", err)
	}
	if !strings.Contains(logs.String(), `principal="cert spiffe://cluster.local/ns/ops/sa/operator" via="tcp 127.0.0.1:`) {
		t.Fatalf("audit log does not name the certificate:\n%s", logs.String())
	}
	nocert, err := ClientTLS("", "", root)
	if err != nil {
		t.Fatal(err)
	}
	nocert.ServerName = "admin.fwdproxy.test"
	anon := &Client{BaseURL: srv.URL, HTTP: &http.Client{Transport: &http.Transport{TLSClientConfig: nocert}}}
	if _, err := anon.Status(context.Background()); err == nil {
		t.Fatal("a client without a certificate was served")
	}
}

// TestTCPWithoutAuthenticationRefusesEveryone: a TCP listener with neither tokens nor client
// certificates (which validation refuses to configure) serves no one, loopback included.
func TestTCPWithoutAuthenticationRefusesEveryone(t *testing.T) {
	srv := httptest.NewServer(newServer(nil, "").Handler())
	defer srv.Close()
	if _, err := (&Client{BaseURL: srv.URL}).Status(context.Background()); err == nil || !strings.Contains(err.Error(), "authenticates no one") {
		t.Fatalf("status over unauthenticated TCP: %v", err)
	}
}

// serveSocket serves s on a socket in dir, with gid as its group.
func serveSocket(t *testing.T, s *Server, dir string, gid int) string {
	t.Helper()
	path := filepath.Join(dir, "admin.sock")
	lis, err := localsock.Listen(path, gid)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ServeSocket(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return path
}

// applyHelper applies doc through the admin socket args[0] and prints the outcome.
func applyHelper(args []string) int {
	_, _, err := (&Client{Socket: args[0]}).Apply(context.Background(), "svc.yaml", []byte(doc))
	if err != nil {
		fmt.Println("apply:", err)
		return 1
	}
	fmt.Println("applied")
	return 0
}

// TestSocketAuthenticatesByUser: on the admin socket the caller is known by its user. Another
// user (nobody, uid 65534) is refused by the socket's mode, and by its credentials when the mode
// would let it in; the daemon's own user is let in and named in the audit log.
func TestSocketAuthenticatesByUser(t *testing.T) {
	n := startNode(t)
	s := newServer(n, "")
	logs := &meshtest.SyncBuffer{}
	s.Log = slog.New(slog.NewTextHandler(logs, nil))
	path := serveSocket(t, s, meshtest.SharedDir(t), -1)

	out, err := meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "apply", path)
	if err == nil || !strings.Contains(out, "permission denied") || !strings.Contains(out, "admin.group") {
		t.Fatalf("nobody on the 0600 socket: %v\n%s", err, out)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err = meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "apply", path)
	if err == nil || !strings.Contains(out, "permission denied: nobody is not root or the daemon's user") {
		t.Fatalf("nobody on a socket its mode lets it into: %v\n%s", err, out)
	}
	if len(n.OperatorServices()) != 0 {
		t.Fatal("another user changed the fleet")
	}
	if !strings.Contains(logs.String(), `msg="admin API request refused" method=POST path=/v1/services caller="nobody (uid 65534)" via="unix socket pid `) {
		t.Fatalf("the refusal is not logged with the caller:\n%s", logs.String())
	}

	me := localsock.Cred{UID: uint32(os.Geteuid())}.Principal()
	if code := applyHelper([]string{path}); code != 0 || len(n.OperatorServices()) != 1 {
		t.Fatalf("the daemon's own user was refused (exit %d)", code)
	}
	want := fmt.Sprintf(`msg="operator entries applied" services=1 hosts=reviews.default.svc.cluster.local changed=1 principal="%s (uid %d)" via="unix socket pid %d"`, me, os.Geteuid(), os.Getpid())
	if !strings.Contains(logs.String(), want) {
		t.Fatalf("audit log lacks %s:\n%s", want, logs.String())
	}

	// The admin group gets in.
	s.Local.GID = meshtest.Nobody
	if out, err := meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "apply", path); err != nil || !strings.Contains(out, "applied") {
		t.Fatalf("nobody in admin.group: %v\n%s", err, out)
	}
}

func TestParseTokens(t *testing.T) {
	ts, err := ParseTokens([]byte("# operators\nalice 0123456789abcdef0123\n\nci   fedcba9876543210fedc\n"))
	if err != nil || len(ts) != 2 || ts[0] != (Token{"alice", "0123456789abcdef0123"}) || ts[1].Name != "ci" {
		t.Fatalf("tokens %v, %v", ts, err)
	}
	if ts, err := ParseTokens([]byte("0123456789abcdef0123\n")); err != nil || ts[0].Name != "default" {
		t.Fatalf("an unnamed token: %v, %v", ts, err)
	}
	for doc, want := range map[string]string{
		"short": "shorter than 16",
		"a 0123456789abcdef0123\na fedcba9876543210fedc": "used twice",
		"a b c":  "want NAME TOKEN",
		"# none": "no token",
	} {
		if _, err := ParseTokens([]byte(doc)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", doc, err, want)
		}
	}
}

func TestMain(m *testing.M) {
	meshtest.RunHelper(map[string]func([]string) int{"apply": applyHelper})
	os.Exit(m.Run())
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

// manyServices is a catalog document of n services.
func manyServices(n int) []byte {
	var b strings.Builder
	b.WriteString("services:\n")
	for i := range n {
		fmt.Fprintf(&b, "  - {host: s%d.bulk.svc.cluster.local, ports: [{number: %d, protocol: tcp}], identities: [spiffe://cluster.local/ns/bulk/sa/s%d]}\n", i, 10000+i, i)
	}
	return []byte(b.String())
}

// TestDeleteManyInOneRequest: many entries go in one request, by host (unknown ones reported as
// missing, the rest deleted) or all of them.
func TestDeleteManyInOneRequest(t *testing.T) {
	n := startNode(t)
	logs := &meshtest.SyncBuffer{}
	s := newServer(n, "s3cret")
	s.Log = slog.New(slog.NewTextHandler(logs, nil))
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	ctx := context.Background()
	c := &Client{BaseURL: srv.URL, Token: "s3cret"}
	if _, changed, err := c.Apply(ctx, "bulk.yaml", manyServices(50)); err != nil || changed != 50 {
		t.Fatalf("apply: %d %v", changed, err)
	}
	res, err := c.DeleteMany(ctx, []string{"S1.bulk.svc.cluster.local.", "s2.bulk.svc.cluster.local", "nope.bulk.svc.cluster.local"}, false)
	if err != nil || strings.Join(res.Deleted, ",") != "s1.bulk.svc.cluster.local,s2.bulk.svc.cluster.local" || strings.Join(res.Missing, ",") != "nope.bulk.svc.cluster.local" {
		t.Fatalf("delete by host: %+v %v", res, err)
	}
	if got := len(n.OperatorServices()); got != 48 {
		t.Fatalf("%d entries left, want 48", got)
	}
	res, err = c.DeleteMany(ctx, nil, true)
	if err != nil || len(res.Deleted) != 48 || len(res.Missing) != 0 || len(n.OperatorServices()) != 0 {
		t.Fatalf("delete all applied: %d deleted, %v; %d left", len(res.Deleted), err, len(n.OperatorServices()))
	}
	if !strings.Contains(logs.String(), `missing=0 all_applied=true principal="token ci"`) {
		t.Fatalf("audit log:\n%s", logs.String())
	}
	if _, err := c.DeleteMany(ctx, nil, false); err == nil || !strings.Contains(err.Error(), "no hosts") {
		t.Fatalf("empty delete: %v", err)
	}
	if _, err := c.DeleteMany(ctx, []string{"a.b"}, true); err == nil || !strings.Contains(err.Error(), "not both") {
		t.Fatalf("hosts and allApplied: %v", err)
	}
}

// TestClientTimeoutIsPerRequest: the client's timeout bounds each request, on the socket too.
func TestClientTimeoutIsPerRequest(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	lis, err := net.Listen("unix", filepath.Join(t.TempDir(), "slow.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-release })}
	go srv.Serve(lis)
	defer srv.Close()
	c := &Client{Socket: lis.Addr().String(), HTTP: &http.Client{Timeout: 200 * time.Millisecond}}
	start := time.Now()
	_, err = c.Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "Timeout") {
		t.Fatalf("err = %v", err)
	}
	if time.Since(start) > 20*time.Second {
		t.Fatal("the request outlived its timeout by far")
	}
}

// BenchmarkUndo5000 applies 5,000 entries in one request and deletes them all in one.
func BenchmarkUndo5000(b *testing.B) {
	n, err := peers.Start(peers.Config{Name: "bench", Bind: "127.0.0.1:0", Profile: "local"})
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	s := newServer(n, "s3cret")
	s.Catalog = catalog.Options{}
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	c := &Client{BaseURL: srv.URL, Token: "s3cret"}
	doc := manyServices(5000)
	ctx := context.Background()
	for b.Loop() {
		b.StopTimer()
		if _, _, err := c.Apply(ctx, "bulk.yaml", doc); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		res, err := c.DeleteMany(ctx, nil, true)
		if err != nil || len(res.Deleted) != 5000 {
			b.Fatalf("%v, %d deleted", err, len(res.Deleted))
		}
	}
}

package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
)

// fakeEnvoy records each start's arguments, crashes on its first run, and on SIGTERM records
// it and exits.
const fakeEnvoy = `#!/bin/sh
state="$(dirname "$0")"
echo "$$ $*" >> "$state/starts"
trap 'echo term >> "$state/terms"; exit 0' TERM
if [ ! -f "$state/crashed" ]; then
  touch "$state/crashed"
  exit 3
fi
touch "$state/trapped"
while :; do sleep 1 & wait $!; done
`

func TestEnvoySupervisor(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "envoy")
	if err := os.WriteFile(bin, []byte(fakeEnvoy), 0o755); err != nil {
		t.Fatal(err)
	}
	var drains atomic.Int32
	admin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/drain_listeners" && r.URL.Query().Has("graceful") {
			drains.Add(1)
		}
	}))
	defer admin.Close()
	p := &envoyProcess{
		Binary: bin, BootstrapPath: filepath.Join(dir, "boot", "envoy.json"),
		AdminAddress: strings.TrimPrefix(admin.URL, "http://"), DrainTime: 300 * time.Millisecond,
		Args: []string{"--concurrency", "1"}, Log: slog.New(slog.DiscardHandler),
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, StopTimeout: 5 * time.Second,
	}
	if err := p.WriteBootstrap("node-1", "fwdproxy", "/run/fwdproxy/xds.sock"); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(p.BootstrapPath)
	if err != nil {
		t.Fatal(err)
	}
	var boot struct {
		Node struct{ ID, Cluster string } `json:"node"`
	}
	if err := json.Unmarshal(raw, &boot); err != nil || boot.Node.ID != "node-1" || !strings.Contains(string(raw), `"pipe":{"path":"/run/fwdproxy/xds.sock"}`) {
		t.Fatalf("bootstrap %s (%v)", raw, err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	starts := func() []string {
		b, _ := os.ReadFile(filepath.Join(dir, "starts"))
		return strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(b)), "\n", " | "))
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.starts.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("envoy was not restarted after exiting: starts %q", starts())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The second run's trap is in place once it wrote "trapped"; then stop: drain, SIGTERM, exit.
	meshtest.Eventually(t, 10*time.Second, "the second run traps SIGTERM", func() bool {
		_, err := os.Stat(filepath.Join(dir, "trapped"))
		return err == nil
	})
	// Both runs got the bootstrap and the drain time.
	b, err := os.ReadFile(filepath.Join(dir, "starts"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 2 {
		t.Fatalf("envoy starts: %q, want 2", lines)
	}
	for _, l := range lines {
		if !strings.HasSuffix(l, "-c "+p.BootstrapPath+" --drain-time-s 1 --disable-hot-restart --concurrency 1") {
			t.Errorf("envoy started with %q", l)
		}
	}
	pid, _ := strconv.Atoi(strings.Fields(lines[len(lines)-1])[0])
	stopped := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if el := time.Since(stopped); el < p.DrainTime {
		t.Errorf("stopped after %v, before the drain time", el)
	}
	if drains.Load() != 1 {
		t.Errorf("admin /drain_listeners?graceful called %d times", drains.Load())
	}
	terms, _ := os.ReadFile(filepath.Join(dir, "terms"))
	if strings.TrimSpace(string(terms)) != "term" {
		t.Errorf("SIGTERM not delivered: %q", terms)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("envoy (pid %d) still running", pid)
	}
	if n := p.starts.Load(); n != 2 {
		t.Errorf("%d starts", n)
	}
}

func TestDialable(t *testing.T) {
	for in, want := range map[string]string{
		"0.0.0.0:18000": "127.0.0.1:18000", ":18000": "127.0.0.1:18000", "[::]:1": "[::1]:1",
		"10.0.0.1:5": "10.0.0.1:5", "bad": "",
	} {
		if got := dialable(in); got != want {
			t.Errorf("dialable(%q) = %q, want %q", in, got, want)
		}
	}
}

// The default data plane runs in the daemon, finds the daemon's xDS server even on port 0,
// and carries a TCP connection through mTLS to the mesh.
func TestBuiltinDataplaneCarriesTraffic(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	writeFleetIdentity(t, ca, dir, time.Hour)
	// The mesh side: one TLS endpoint for the service's identity that names its caller.
	srvLeaf, err := ca.IssueFor("spiffe://cluster.local/ns/ns/sa/db", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(srvLeaf.ChainPEM, srvLeaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Root)
	mesh, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots})
	if err != nil {
		t.Fatal(err)
	}
	defer mesh.Close()
	go func() {
		for {
			c, err := mesh.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			if tc.Handshake() == nil {
				fmt.Fprintf(tc, "caller %s sni %s\n", tc.ConnectionState().PeerCertificates[0].URIs[0], tc.ConnectionState().ServerName)
			}
			tc.Close()
		}
	}()
	svcPort, metricsPort := freePort(t), freePort(t)
	catalogText := fmt.Sprintf("services:\n  - host: db.ns.svc.cluster.local\n    ports: [{number: %d, protocol: tcp}]\n    identities: [spiffe://cluster.local/ns/ns/sa/db]\n", svcPort)
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte(catalogText), 0o644); err != nil {
		t.Fatal(err)
	}
	_, gwPort, _ := net.SplitHostPort(mesh.Addr().String())
	cfgText := fmt.Sprintf(`
node: {id: builtin-test}
gateways: [{name: gw, address: 127.0.0.1, port: %s}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
admin: {socket: admin.sock}
metrics: {address: 127.0.0.1:%d}
builtin: {drainTime: 1s}
`, gwPort, metricsPort)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Dataplane != "builtin" {
		t.Fatalf("default data plane %q", cfg.Dataplane)
	}
	d := New(cfg, slog.New(slog.DiscardHandler))
	defer runDaemon(t, d)()
	var line string
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", svcPort))
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			b, _ := io.ReadAll(c)
			c.Close()
			if line = string(b); line != "" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no traffic through the built-in data plane (last: %v %q)", err, line)
		}
		time.Sleep(50 * time.Millisecond)
	}
	want := fmt.Sprintf("caller spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy sni outbound_.%d_._.db.ns.svc.cluster.local\n", svcPort)
	if line != want {
		t.Errorf("mesh saw %q, want %q", line, want)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(m), fmt.Sprintf(`fwdproxy_dataplane_connections_total{listener="127.0.0.1_%d"}`, svcPort)) {
		t.Error("/metrics lacks the data plane's connection counter")
	}
	if ok, why := d.Ready(); !ok {
		t.Errorf("not ready: %s", why)
	}
}

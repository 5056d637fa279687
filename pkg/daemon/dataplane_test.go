package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
)

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

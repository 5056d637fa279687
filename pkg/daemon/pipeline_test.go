package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	client "github.com/envoyproxy/go-control-plane/pkg/client/sotw/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
)

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// fleetID is the identity the test daemons present.
const fleetID = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"

// writeFleetIdentity issues the fleet identity from ca, valid for ttl, into dir as
// cert-chain.pem, key.pem and root-cert.pem.
func writeFleetIdentity(t *testing.T, ca *meshtest.CA, dir string, ttl time.Duration) *meshtest.Leaf {
	t.Helper()
	leaf, err := ca.IssueFor(fleetID, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(dir, ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	return leaf
}

// runDaemon runs d until stop is called, or the test ends; stop reports an error from Run and
// a daemon that does not stop within 10s.
func runDaemon(t *testing.T, d *Daemon) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("daemon %s: %v", d.cfg.Node.ID, err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("daemon %s did not stop within 10s", d.cfg.Node.ID)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

type pipelineEnv struct {
	dir, catalogPath string
	logs             *meshtest.SyncBuffer
	cfg              *config.Config
	ca               *meshtest.CA
	d                *Daemon
}

func pipelineCatalog(port int, extra string) string {
	return fmt.Sprintf(`services:
  - host: a.ns.svc.cluster.local
    ports: [{number: %d, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
%s`, port, extra)
}

func startPipeline(t *testing.T) *pipelineEnv {
	t.Helper()
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	writeFleetIdentity(t, ca, dir, time.Hour)
	env := &pipelineEnv{dir: dir, ca: ca, catalogPath: filepath.Join(dir, "catalog.yaml")}
	if err := os.WriteFile(env.catalogPath, []byte(pipelineCatalog(freePort(t), "")), 0o644); err != nil {
		t.Fatal(err)
	}
	cfgText := fmt.Sprintf(`
node: {id: test-node}
gateways: [{name: gw, address: 127.0.0.1, port: %d}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: 127.0.0.1:%d}
admin: {socket: admin.sock}
`, freePort(t), freePort(t))
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}
	env.cfg, err = config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	env.logs = &meshtest.SyncBuffer{}
	env.d = New(env.cfg, slog.New(slog.NewTextHandler(env.logs, nil)))
	runDaemon(t, env.d)
	return env
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	meshtest.Eventually(t, 15*time.Second, what, cond)
}

func adsClusters(t *testing.T, addr string) (client.ADSClient, func() []string) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	c := client.NewADSClient(ctx, &core.Node{Id: "pipeline-test"}, resource.ClusterType)
	if err := c.InitConnect(conn); err != nil {
		t.Fatal(err)
	}
	return c, func() []string {
		r, err := c.Fetch()
		if err != nil {
			t.Fatalf("fetch: %v", err)
		}
		var names []string
		for _, a := range r.Resources {
			cl := &cluster.Cluster{}
			if err := a.UnmarshalTo(cl); err != nil {
				t.Fatal(err)
			}
			names = append(names, cl.Name)
		}
		if err := c.Ack(); err != nil {
			t.Fatal(err)
		}
		return names
	}
}

// TestPipelineCatalogEdits drives the daemon from file edits to xDS: a good edit is served, a bad
// one is rejected while the last good configuration keeps serving.
func TestPipelineCatalogEdits(t *testing.T) {
	env := startPipeline(t)
	eventually(t, "first snapshot", func() bool { return env.d.XDS.Current() != nil })
	_, next := adsClusters(t, "unix:"+env.cfg.XDSSocket())
	if got := next(); len(got) != 1 {
		t.Fatalf("clusters: %v", got)
	}
	first := env.d.XDS.Current().ConfigVersion

	// A bad edit: the same TCP port twice.
	tcpPort := freePort(t)
	bad := pipelineCatalog(freePort(t), fmt.Sprintf(`  - host: b.ns.svc.cluster.local
    ports: [{number: %d, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
  - host: c.ns.svc.cluster.local
    ports: [{number: %d, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/c]
`, tcpPort, tcpPort))
	if err := os.WriteFile(env.catalogPath, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the bad edit rejected", func() bool {
		return strings.Contains(env.logs.String(), fmt.Sprintf("port %d (tcp) collides with b.ns.svc.cluster.local", tcpPort))
	})
	if v := env.d.XDS.Current().ConfigVersion; v != first {
		t.Fatalf("a rejected edit changed the served version %s -> %s", first, v)
	}

	good := pipelineCatalog(freePort(t), fmt.Sprintf(`  - host: b.ns.svc.cluster.local
    ports: [{number: %d, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`, tcpPort))
	if err := os.WriteFile(env.catalogPath, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := next(); len(got) != 2 {
		t.Fatalf("clusters after edit: %v", got)
	}
}

// TestPipelineIdentityRotation replaces the identity files and expects a new secrets version,
// and a rejected (foreign) certificate to leave the current one serving.
func TestPipelineIdentityRotation(t *testing.T) {
	env := startPipeline(t)
	eventually(t, "first snapshot", func() bool { return env.d.XDS.Current() != nil })
	v1 := env.d.XDS.Current().SecretsVersion

	other, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := other.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(env.dir, "cert-chain.pem"), foreign.ChainPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the foreign certificate rejected", func() bool {
		return strings.Contains(env.logs.String(), "identity files rejected; still serving the last good identity")
	})
	if env.d.XDS.Current().SecretsVersion != v1 {
		t.Fatal("a certificate that does not match the key and roots was served")
	}

	writeFleetIdentity(t, env.ca, env.dir, 2*time.Hour)
	eventually(t, "rotated secrets", func() bool { return env.d.XDS.Current().SecretsVersion != v1 })
}

package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

type fleetMember struct {
	d       *Daemon
	admin   *admin.Client
	catalog string
	stop    func()
}

// startFleetMember runs a daemon with gossip on loopback; its catalog file holds host.
func startFleetMember(t *testing.T, ca *meshtest.CA, keyring, name string, gossipPort int, seeds []int, host string) *fleetMember {
	t.Helper()
	dir := t.TempDir()
	writeFleetIdentity(t, ca, dir, time.Hour)
	cat := filepath.Join(dir, "catalog.yaml")
	if err := os.WriteFile(cat, []byte(fmt.Sprintf(`services:
  - host: %s
    ports: [{number: %d, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`, host, freePort(t))), 0o644); err != nil {
		t.Fatal(err)
	}
	var seedList []string
	for _, p := range seeds {
		seedList = append(seedList, fmt.Sprintf("127.0.0.1:%d", p))
	}
	cfgText := fmt.Sprintf(`
node: {id: %s}
gateways: [{name: gw, address: 127.0.0.1, port: %d}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: 127.0.0.1:%d}
admin: {socket: admin.sock}
dataplane: none
peers:
  bind: 127.0.0.1:%d
  seeds: [%s]
  keyring: %s
  timing: local
`, name, freePort(t), freePort(t), gossipPort, joinComma(seedList), keyring)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	d := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	return &fleetMember{d: d, admin: &admin.Client{Socket: cfg.AdminSocket()}, catalog: cat, stop: runDaemon(t, d)}
}

func joinComma(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += ", "
		}
		out += x
	}
	return out
}

// servedHosts lists the services in the xDS snapshot the daemon serves (by cluster name).
func servedHosts(d *Daemon) []string {
	cur := d.XDS.Current()
	if cur == nil {
		return nil
	}
	var hosts []string
	for name := range cur.Cache.GetResources(resource.ClusterType) {
		// outbound|PORT|SUBSET|FQDN
		if parts := strings.Split(name, "|"); len(parts) == 4 && !slices.Contains(hosts, parts[3]) {
			hosts = append(hosts, parts[3])
		}
	}
	slices.Sort(hosts)
	return hosts
}

func TestFleetSharesOneConfiguration(t *testing.T) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	keyring := filepath.Join(t.TempDir(), "gossip.keys")
	if err := os.WriteFile(keyring, []byte(peers.GenerateKey()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pa, pb := freePort(t), freePort(t)
	a := startFleetMember(t, ca, keyring, "node-a", pa, nil, "from-a.ns.svc.cluster.local")
	b := startFleetMember(t, ca, keyring, "node-b", pb, []int{pa}, "from-b.ns.svc.cluster.local")

	// node-a leads (lowest name): both serve its discovered catalog, not node-b's file.
	eventually(t, "both serve the leader's catalog", func() bool {
		return slices.Equal(servedHosts(a.d), []string{"from-a.ns.svc.cluster.local"}) &&
			slices.Equal(servedHosts(b.d), []string{"from-a.ns.svc.cluster.local"})
	})
	eventually(t, "node-b is ready from the fleet store", func() bool { ok, _ := b.d.Ready(); return b.d.XDS.Current() != nil || ok })

	// An operator entry applied on node-b reaches node-a.
	ctx := context.Background()
	if _, _, err := b.admin.Apply(ctx, "op.yaml", []byte(`services:
  - host: operator.ns.svc.cluster.local
    ports: [{number: 7070, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/op]
`)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the operator entry is served on node-a", func() bool {
		return slices.Contains(servedHosts(a.d), "operator.ns.svc.cluster.local")
	})
	eventually(t, "status shows a converged fleet of two", func() bool {
		st, err := a.admin.Status(ctx)
		return err == nil && st.Gossip && st.Leader && st.Converged && len(st.Members) == 2 && st.Identity != nil &&
			st.Identity.NotAfter.After(time.Now()) && st.Members[0].Digest == st.Members[1].Digest && st.Members[0].Digest == st.Digest
	})
	st, _ := b.admin.Status(ctx)
	if st.Leader || st.Node != "node-b" {
		t.Fatalf("node-b status: %+v", st)
	}

	// node-a leaves: node-b takes over discovery and its own file becomes the discovered catalog.
	a.stop()
	eventually(t, "node-b leads and serves its own discovery", func() bool {
		h := servedHosts(b.d)
		return b.d.FleetStatus(nil).Leader && slices.Equal(h, []string{"from-b.ns.svc.cluster.local", "operator.ns.svc.cluster.local"})
	})
}

// TestAdminAuthenticatesEveryCaller: the daemon's admin API on its socket (the daemon's own user
// gets in, nobody does not) and on TCP with a named token from admin.tokenFile (none: refused,
// loopback included).
func TestAdminAuthenticatesEveryCaller(t *testing.T) {
	dir := meshtest.SharedDir(t)
	tokenFile := filepath.Join(dir, "admin.token")
	if err := os.WriteFile(tokenFile, []byte("# operators\nops 0123456789abcdef0123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	cfg, _ := readyFixtureIn(t, dir, fmt.Sprintf("admin: {socket: admin.sock, address: %q, tokenFile: admin.token}\n", addr))
	runDaemon(t, New(cfg, slog.New(slog.DiscardHandler)))
	ctx := context.Background()
	meshtest.Eventually(t, 10*time.Second, "status on the admin socket", func() bool {
		st, err := (&admin.Client{Socket: cfg.AdminSocket()}).Status(ctx)
		return err == nil && st.Node == cfg.Node.ID
	})
	if fi, err := os.Stat(cfg.AdminSocket()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode %v (%v), want 0600 without admin.group", fi.Mode(), err)
	}
	// The TCP listener starts beside the socket's, not before it.
	meshtest.Eventually(t, 10*time.Second, "status on TCP with the token", func() bool {
		st, err := (&admin.Client{BaseURL: "http://" + addr, Token: "0123456789abcdef0123"}).Status(ctx)
		return err == nil && st.Node == cfg.Node.ID
	})
	if _, err := (&admin.Client{BaseURL: "http://" + addr}).Status(ctx); err == nil || !strings.Contains(err.Error(), "bearer token") {
		t.Fatalf("status on TCP without a token: %v", err)
	}
	out, err := meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "admin-status", cfg.AdminSocket())
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("status as nobody: %v\n%s", err, out)
	}
}

// adminStatusHelper asks the admin socket args[0] for the status, as another user.
func adminStatusHelper(args []string) int {
	if _, err := (&admin.Client{Socket: args[0]}).Status(context.Background()); err != nil {
		fmt.Println("status:", err)
		return 1
	}
	fmt.Println("status ok")
	return 0
}

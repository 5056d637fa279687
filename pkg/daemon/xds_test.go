package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

func TestMain(m *testing.M) {
	meshtest.RunHelper(map[string]func([]string) int{"fetch-key": fetchKeyHelper, "admin-status": adminStatusHelper})
	os.Exit(m.Run())
}

// fetchKey asks the xDS server at target for SDS secret "default", as any go-control-plane
// client would, and reports whether it got the fleet's private key.
func fetchKey(target string, creds credentials.TransportCredentials) (bool, error) {
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return false, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := discoverypb.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return false, err
	}
	if err := stream.Send(&discoverypb.DiscoveryRequest{Node: &core.Node{Id: "intruder"}, TypeUrl: resource.SecretType, ResourceNames: []string{controlplane.SecretCertificate, controlplane.SecretRoots}}); err != nil {
		return false, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return false, err
	}
	for _, a := range resp.GetResources() {
		s := &tlsv3.Secret{}
		if err := a.UnmarshalTo(s); err == nil && s.Name == controlplane.SecretCertificate && len(s.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) > 0 {
			return true, nil
		}
	}
	return false, fmt.Errorf("a response without the key: %d resources", len(resp.GetResources()))
}

// fetchKeyHelper runs as another user: args[0] is the xDS socket.
func fetchKeyHelper(args []string) int {
	got, err := fetchKey("unix:"+args[0], insecure.NewCredentials())
	if got {
		fmt.Println("GOT THE FLEET'S PRIVATE KEY")
		return 0
	}
	fmt.Println("no key:", err)
	return 1
}

// TestXDSKeyOnlyForTheDataPlane: the xDS server hands the fleet's private key (SDS "default")
// only to callers it authenticates. Another local user (nobody, uid 65534) asking on the socket
// gets nothing: the socket's mode keeps it out, and when the mode would let it in, the peer
// credential check refuses it. The group in xds.group is let in.
func TestXDSKeyOnlyForTheDataPlane(t *testing.T) {
	dir := meshtest.SharedDir(t) // the socket's directory is open to all, like /run/fwdproxy
	cfg, _ := readyFixtureIn(t, dir, "")
	logs := &meshtest.SyncBuffer{}
	stop := runDaemon(t, New(cfg, slog.New(slog.NewTextHandler(logs, nil))))
	socket := cfg.XDSSocket()
	if filepath.Dir(socket) != dir {
		t.Fatalf("socket %s is not in %s", socket, dir)
	}
	meshtest.Eventually(t, 10*time.Second, "the daemon's own user gets the key", func() bool {
		got, _ := fetchKey("unix:"+socket, insecure.NewCredentials())
		return got
	})
	if fi, err := os.Stat(socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v (%v), want 0600 without xds.group", fi.Mode(), err)
	}

	out, err := meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "fetch-key", socket)
	if err == nil || strings.Contains(out, "GOT") || !strings.Contains(out, "permission denied") {
		t.Fatalf("nobody on the 0600 socket: %v\n%s", err, out)
	}
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err = meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "fetch-key", socket)
	if err == nil || strings.Contains(out, "GOT") {
		t.Fatalf("nobody on a socket its mode lets it into: %v\n%s", err, out)
	}
	if l := logs.String(); !strings.Contains(l, `msg="xDS connection refused: this local user may not fetch the fleet's configuration and key" component=xds peer="uid 65534 (nobody) gid 65534 pid `) ||
		!strings.Contains(l, `reason="nobody is not root or the daemon's user (root); set xds.group to let a group in"`) {
		t.Fatalf("the refusal is not logged with the peer:\n%s", l)
	}
	stop()

	// With the data plane's group in xds.group, that group gets the key.
	dir = meshtest.SharedDir(t)
	cfg, _ = readyFixtureIn(t, dir, fmt.Sprintf("xds: {socket: xds.sock, group: '%d'}\n", meshtest.Nobody))
	runDaemon(t, New(cfg, slog.New(slog.DiscardHandler)))
	meshtest.Eventually(t, 10*time.Second, "the xDS socket", func() bool { _, err := os.Stat(cfg.XDSSocket()); return err == nil })
	fi, _ := os.Stat(cfg.XDSSocket())
	if fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v with xds.group, want 0660", fi.Mode().Perm())
	}
	meshtest.Eventually(t, 10*time.Second, "xds.group gets the key", func() bool {
		out, err := meshtest.AsUser(t, meshtest.Nobody, meshtest.Nobody, "fetch-key", cfg.XDSSocket())
		return err == nil && strings.Contains(out, "GOT")
	})
}

// TestXDSOverTCPNeedsAClientCertificate: xds.address serves data planes on other hosts, only
// with a client certificate from xds.tls.clientCA; they never count for this instance's
// readiness.
func TestXDSOverTCPNeedsAClientCertificate(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("dataplanes")
	if err != nil {
		t.Fatal(err)
	}
	server, _ := ca.IssueWithDNS("spiffe://cluster.local/ns/fwdproxy/sa/xds", []string{"xds.fwdproxy.test"}, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	sdir := filepath.Join(dir, "xds-tls")
	if err := os.Mkdir(sdir, 0o700); err != nil {
		t.Fatal(err)
	}
	chain, key, root, err := server.WriteFiles(sdir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	cfg, _ := readyFixtureIn(t, dir, fmt.Sprintf("xds: {socket: xds.sock, address: %q, tls: {certChain: %q, privateKey: %q, clientCA: %q}}\n", addr, chain, key, root))
	d := New(cfg, slog.New(slog.DiscardHandler))
	runDaemon(t, d)

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.RootPEM)
	anon := &tls.Config{RootCAs: pool, ServerName: "xds.fwdproxy.test", MinVersion: tls.VersionTLS12}
	meshtest.Eventually(t, 10*time.Second, "the TCP listener", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	if got, err := fetchKey(addr, credentials.NewTLS(anon)); got || err == nil {
		t.Fatalf("a TCP client without a certificate: got key %v, %v", got, err)
	}
	if got, err := fetchKey(addr, insecure.NewCredentials()); got || err == nil {
		t.Fatalf("a plain-text TCP client: got key %v, %v", got, err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/laptops/sa/dataplane", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := tls.X509KeyPair(leaf.ChainPEM, leaf.KeyPEM)
	withCert := anon.Clone()
	withCert.Certificates = []tls.Certificate{cert}
	meshtest.Eventually(t, 10*time.Second, "a TCP client with a certificate gets the key", func() bool {
		got, _ := fetchKey(addr, credentials.NewTLS(withCert))
		return got
	})
	if ok, why := d.Ready(); ok {
		t.Fatalf("ready (%s) with only a TCP client", why)
	}
}

// TestIsDataPlane: the clients that count for readiness, per data plane setting.
func TestIsDataPlane(t *testing.T) {
	cfg, _ := readyFixture(t)
	d := New(cfg, slog.New(slog.DiscardHandler))
	d.envoyUID = 1000
	inproc := controlplane.Peer{Transport: controlplane.InProcess}
	unixAs := func(uid uint32) controlplane.Peer {
		return controlplane.Peer{Transport: controlplane.UnixSocket, CredKnown: true, Cred: localsock.Cred{UID: uid}}
	}
	tcp := controlplane.Peer{Transport: controlplane.TCP, Identity: "spiffe://cluster.local/ns/laptops/sa/dp"}
	node := cfg.Node.ID
	for _, c := range []struct {
		dataplane string
		client    controlplane.Client
		want      bool
	}{
		{"builtin", controlplane.Client{Node: node, Peer: inproc}, true},
		{"builtin", controlplane.Client{Node: node, Peer: unixAs(0)}, false},
		{"builtin", controlplane.Client{Node: "other", Peer: inproc}, false},
		{"envoy", controlplane.Client{Node: node, Peer: unixAs(1000)}, true},
		{"envoy", controlplane.Client{Node: node, Peer: unixAs(998)}, false},
		{"envoy", controlplane.Client{Node: node, Peer: tcp}, false},
		{"none", controlplane.Client{Node: node, Peer: unixAs(998)}, true},
		{"none", controlplane.Client{Node: "other", Peer: unixAs(998)}, false},
		{"none", controlplane.Client{Node: node, Peer: tcp}, false},
		{"none", controlplane.Client{Node: node}, false},
	} {
		d.cfg.Dataplane = c.dataplane
		if got := d.isDataPlane(c.client); got != c.want {
			t.Errorf("dataplane %s, client %s %s: %v, want %v", c.dataplane, c.client.Node, c.client.Peer, got, c.want)
		}
	}
}

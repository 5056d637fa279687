package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

// TestFleetVerbs runs the built binary against an admin API backed by a real (single) gossip
// peer: on its Unix socket, found through the config, and on TCP with a named token.
func TestFleetVerbs(t *testing.T) {
	node, err := peers.Start(peers.Config{Name: "cli-node", Bind: "127.0.0.1:0", Profile: "local"})
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	token := "0123456789abcdef0123"
	logs := &meshtest.SyncBuffer{}
	srv := &admin.Server{
		Fleet: node, Tokens: []admin.Token{{Name: "ci", Secret: token}}, Log: slog.New(slog.NewTextHandler(logs, nil)),
		Local: localsock.Policy{UID: uint32(os.Geteuid()), GID: -1, Field: "admin.group"},
		Status: func() admin.Status {
			d, n := node.Digest()
			return admin.Status{Node: "cli-node", Gossip: true, Leader: node.Leader(), Digest: d, Entries: n, Converged: node.Converged(),
				Members: node.Members(), Ready: true, ReadyReason: "ready",
				Identity: &admin.Identity{SPIFFEID: "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", NotAfter: time.Now().Add(48 * time.Hour)},
				Skipped:  []admin.SkippedService{{Host: "ratings.default.svc.cluster.local", Reason: "no_gateway_address", Detail: `none of its gateways ("eastwest-b") has a known address yet`}},
				Services: []admin.ServiceState{
					{Host: "ratings.default.svc.cluster.local", State: admin.StateSkipped, Ports: []uint32{9080}, Reason: "no_gateway_address", Detail: `none of its gateways ("eastwest-b") has a known address yet`},
					{Host: "reviews.default.svc.cluster.local", State: admin.StateServed, Ports: []uint32{9080, 9443}},
				}}
		},
	}
	tcp := httptest.NewServer(srv.Handler())
	defer tcp.Close()
	shared := meshtest.SharedDir(t)
	socket := filepath.Join(shared, "admin.sock")
	sock, err := localsock.Listen(socket, -1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.ServeSocket(ctx, sock)

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(`gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
admin: {socket: %s}
`, socket)), 0o644); err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("ci "+token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "svc.yaml")
	if err := os.WriteFile(file, []byte(`services:
  - host: reviews.default.svc.cluster.local
    ports: [{number: 9080, protocol: http}]
    identities: [spiffe://cluster.local/ns/default/sa/reviews]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		cmd := exec.Command(binary, args...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		return out.String(), err
	}
	// By default the verbs use the config's admin socket; the caller is known by its user.
	out, err := run("apply", "--config", cfgPath, "-f", file)
	if err != nil || !strings.Contains(out, "applied 1 service(s), 1 changed: reviews.default.svc.cluster.local") {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	if got := node.OperatorServices(); len(got) != 1 {
		t.Fatalf("store: %+v", got)
	}
	me := localsock.Cred{UID: uint32(os.Geteuid())}.Principal()
	if !strings.Contains(logs.String(), fmt.Sprintf(`msg="operator entries applied" services=1 hosts=reviews.default.svc.cluster.local changed=1 principal="%s (uid %d)" via="unix socket pid `, me, os.Geteuid())) {
		t.Fatalf("audit log:\n%s", logs.String())
	}
	for deadline := time.Now().Add(5 * time.Second); !node.Converged() && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond) // the digest is advertised asynchronously
	}
	out, err = run("status", "--config", cfgPath)
	d, _ := node.Digest()
	if err != nil || !strings.Contains(out, "cli-node (member, runs discovery)") || !strings.Contains(out, "converged:  yes") ||
		!strings.Contains(out, "digest "+d+", 1 entries") || !strings.Contains(out, "expires ") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	// The services this instance leaves out of its configuration, each with its reason.
	for _, want := range []string{"left out:   1 service not in the configuration; every other service is served",
		`ratings.default.svc.cluster.local (no_gateway_address): none of its gateways ("eastwest-b") has a known address yet`} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}

	// Every service's state, in the table and for machines.
	for _, want := range []string{"services:   1 served, 1 skipped", "SERVICE                            STATE    PORTS  WHY\n",
		`ratings.default.svc.cluster.local  skipped  9080   no_gateway_address: none of its gateways ("eastwest-b") has a known address yet`,
		"reviews.default.svc.cluster.local  served   9080,9443\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	for _, format := range []string{"json", "yaml"} {
		out, err := exec.Command(binary, "status", "-o", format, "--config", cfgPath).Output()
		var st admin.Status
		if format == "json" {
			err = errors.Join(err, json.Unmarshal(out, &st))
		} else {
			err = errors.Join(err, yaml.Unmarshal(out, &st))
		}
		if err != nil || st.Node != "cli-node" || len(st.Services) != 2 || st.Services[0].State != "skipped" || st.Services[0].Reason != "no_gateway_address" ||
			st.Services[1].State != "served" || len(st.Services[1].Ports) != 2 {
			t.Errorf("status -o %s: %v %+v\n%s", format, err, st, out)
		}
	}

	// Another user gets nothing from the socket, whether its mode or its credentials stop it.
	if err := os.Chmod(filepath.Dir(binary), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err = meshtest.RunAs(t, meshtest.Nobody, meshtest.Nobody, nil, binary, "delete", "--admin", socket, "reviews.default.svc.cluster.local")
	if err == nil || !strings.Contains(out, "permission denied") || !strings.Contains(out, "admin.group") {
		t.Fatalf("delete as nobody: %v\n%s", err, out)
	}
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err = meshtest.RunAs(t, meshtest.Nobody, meshtest.Nobody, nil, binary, "delete", "--admin", "unix:"+socket, "reviews.default.svc.cluster.local")
	if err == nil || !strings.Contains(out, "permission denied: nobody is not root or the daemon's user") {
		t.Fatalf("delete as nobody through a 0666 socket: %v\n%s", err, out)
	}
	if len(node.OperatorServices()) != 1 {
		t.Fatal("another user deleted an entry")
	}

	// On TCP, with a token.
	common := []string{"--config", filepath.Join(dir, "none.yaml"), "--admin", tcp.URL, "--token-file", tokenFile}
	// Flags after the hosts are flags (not hosts), and the hosts go in one request.
	out, err = run(append([]string{"delete", "reviews.default.svc.cluster.local", "nope.default.svc.cluster.local"}, common...)...)
	if err == nil || !strings.Contains(out, "deleted reviews.default.svc.cluster.local") || !strings.Contains(out, "no operator entry for nope.default.svc.cluster.local") {
		t.Fatalf("delete: %v\n%s", err, out)
	}
	if len(node.OperatorServices()) != 0 {
		t.Fatal("entry not deleted")
	}
	if strings.Contains(logs.String(), "--admin") || strings.Count(logs.String(), `msg="operator entries deleted"`) != 1 {
		t.Fatalf("the delete was not one request for the two hosts:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), `msg="operator entries deleted" deleted=1 hosts=reviews.default.svc.cluster.local missing=1 all_applied=false principal="token ci" via="tcp 127.0.0.1:`) {
		t.Fatalf("audit log:\n%s", logs.String())
	}
	// Without the token the API refuses, and the CLI says why.
	out, err = run("status", "--config", filepath.Join(dir, "none.yaml"), "--admin", tcp.URL)
	if err == nil || !strings.Contains(out, "bearer token") {
		t.Fatalf("status without token: %v\n%s", err, out)
	}
	// A bad file is refused with its line.
	if err := os.WriteFile(file, []byte("services:\n  - host: x.default.svc.cluster.local\n    ports: [{number: 0, protocol: http}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = run("apply", "--config", cfgPath, "-f", file)
	if err == nil || !strings.Contains(out, "svc.yaml:3") {
		t.Fatalf("bad apply: %v\n%s", err, out)
	}
}

func TestKeygen(t *testing.T) {
	out, err := exec.Command(binary, "keygen").Output()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := peers.ParseKeyring(out)
	if err != nil || len(keys) != 1 || len(keys[0]) != 32 {
		t.Fatalf("keygen output %q: %v", out, err)
	}
	again, err := exec.Command(binary, "keygen").Output()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(out, again) {
		t.Fatal("two keys are equal")
	}
}

// TestBulkUndo applies 5,000 entries with one command and undoes them with one, by file and then
// with --all-applied; each is one admin request bounded by --timeout. It logs how long the
// undo took (a figure, not an assertion).
func TestBulkUndo(t *testing.T) {
	node, err := peers.Start(peers.Config{Name: "bulk-node", Bind: "127.0.0.1:0", Profile: "local"})
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	logs := &meshtest.SyncBuffer{}
	srv := &admin.Server{Fleet: node, Log: slog.New(slog.NewTextHandler(logs, nil)),
		Local:  localsock.Policy{UID: uint32(os.Geteuid()), GID: -1, Field: "admin.group"},
		Status: func() admin.Status { return admin.Status{Node: "bulk-node"} }}
	socket := filepath.Join(meshtest.SharedDir(t), "admin.sock")
	sock, err := localsock.Listen(socket, -1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.ServeSocket(ctx, sock)

	dir := t.TempDir()
	var b strings.Builder
	b.WriteString("services:\n")
	for i := range 5000 {
		fmt.Fprintf(&b, "  - {host: s%d.bulk.svc.cluster.local, ports: [{number: %d, protocol: tcp}], identities: [spiffe://cluster.local/ns/bulk/sa/s%d]}\n", i, 10000+i, i)
	}
	file := filepath.Join(dir, "bulk.yaml")
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	common := []string{"--admin", socket, "--config", filepath.Join(dir, "none.yaml"), "--timeout", "60s"}
	runCLI := func(args ...string) (string, time.Duration) {
		t.Helper()
		start := time.Now()
		out, err := exec.Command(binary, append(args, common...)...).CombinedOutput()
		took := time.Since(start)
		if err != nil {
			t.Fatalf("fwdproxy %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out), took
	}
	for _, undo := range [][]string{{"delete", "-f", file}, {"delete", "--all-applied"}} {
		out, _ := runCLI("apply", "-f", file)
		if !strings.Contains(out, "applied 5000 service(s), 5000 changed") || len(node.OperatorServices()) != 5000 {
			t.Fatalf("apply: %.200s; %d entries", out, len(node.OperatorServices()))
		}
		out, took := runCLI(undo...)
		if !strings.HasSuffix(out, "deleted 5000 operator entries\n") || strings.Count(out, "\n") != 1 || len(node.OperatorServices()) != 0 {
			t.Fatalf("%s: %.300s; %d entries left", strings.Join(undo, " "), out, len(node.OperatorServices()))
		}
		t.Logf("fwdproxy %s: 5000 entries undone in %v", strings.Join(undo, " "), took.Round(time.Millisecond))
	}
	if n := strings.Count(logs.String(), `msg="operator entries deleted" deleted=5000`); n != 2 {
		t.Fatalf("%d delete requests of 5000 entries, want 2 (one per command)", n)
	}
}

package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
)

// TestStandaloneDataplane: `fwdproxy dataplane --xds SOCKET` against a daemon with dataplane:
// none, as on an instance where systemd runs the data plane. Under the daemon's node ID it is
// the instance's data plane, so /ready follows it; it stops when the data plane goes.
func TestStandaloneDataplane(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor(demoFleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(dir, ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	port, err := meshtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte(fmt.Sprintf("services:\n  - host: db.ns.svc.cluster.local\n    ports: [{number: %d, protocol: tcp}]\n    identities: [spiffe://cluster.local/ns/ns/sa/db]\n", port)), 0o644); err != nil {
		t.Fatal(err)
	}
	metricsPort, err := meshtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metrics := "127.0.0.1:" + strconv.Itoa(metricsPort)
	if err := os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(fmt.Sprintf(`node: {id: standalone}
gateways: [{name: gw, address: 127.0.0.1}]
identity:
  spiffeID: %s
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
admin: {socket: admin.sock}
metrics: {address: %s}
dataplane: none
`, demoFleetID, metrics)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(filepath.Join(dir, "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- daemon.New(cfg, slog.New(slog.DiscardHandler)).Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	ready := func() string {
		resp, err := http.Get("http://" + metrics + "/ready")
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strconv.Itoa(resp.StatusCode) + " " + strings.TrimSpace(string(b))
	}
	meshtest.Eventually(t, 10*time.Second, "/ready waiting for a data plane", func() bool {
		return strings.HasPrefix(ready(), "503 no data plane has acknowledged")
	})

	dp := exec.Command(binary, "dataplane", "--xds", cfg.XDSSocket(), "--node-id", "standalone", "--log-format", "text")
	var logs meshtest.SyncBuffer
	dp.Stdout, dp.Stderr = &logs, &logs
	if err := dp.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { dp.Process.Kill(); dp.Wait() }()
	meshtest.Eventually(t, 15*time.Second, "/ready with the data plane", func() bool { return ready() == "200 ready" })
	meshtest.Eventually(t, 5*time.Second, "the data plane's listener", func() bool {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	dp.Process.Signal(os.Interrupt)
	dp.Wait()
	meshtest.Eventually(t, 10*time.Second, "/ready without the data plane", func() bool {
		return strings.HasPrefix(ready(), "503 no data plane has acknowledged")
	})
	if t.Failed() {
		t.Log(logs.String())
	}
}

//go:build linux

package main

import (
	"fmt"
	"io"
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
)

// The operator's report: with `ulimit -n 1024`, 1,100 idle connections to a service port took
// every file descriptor and /ready could no longer be reached, so the load balancer took the
// instance out. The built-in data plane now caps its connections below the file limit and
// closes the rest at once; /ready answers throughout. (512 here, and 600 connections.)
func TestIdleConnectionsPastTheFileLimitLeaveReadyReachable(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
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
	addr := func() string {
		a, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	metrics := addr()
	catalog := fmt.Sprintf("services:\n  - host: web.ns.svc.cluster.local\n    ports: [{number: %d, protocol: http}]\n    identities: [spiffe://cluster.local/ns/ns/sa/web]\n", port)
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte(catalog), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`node: {id: fd-test}
gateways: [{name: gw, address: 127.0.0.1, port: 15443}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
builtin: {drainTime: 1s}
`, metrics)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "ulimit -n 512 && exec \"$0\" run --config \"$1\"", binary, cfgPath)
	var logs meshtest.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("daemon output:\n%s", logs.String())
		}
	})
	// A new connection each time, as the load balancer's health check makes.
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	ready := func() (int, string, error) {
		resp, err := client.Get("http://" + metrics + "/ready")
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b)), nil
	}
	meshtest.Eventually(t, 20*time.Second, "the daemon to be ready", func() bool { code, _, _ := ready(); return code == 200 })

	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range 600 {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	// The cap is hit (the refusals are counted); /ready answers all the same.
	series := `fwdproxy_dataplane_connections_refused_total{listener="127.0.0.1_` + strconv.Itoa(port) + `",reason="overload"}`
	meshtest.Eventually(t, 10*time.Second, "the refused connections counted in /metrics", func() bool {
		resp, err := client.Get("http://" + metrics + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		m, err := io.ReadAll(resp.Body)
		return err == nil && strings.Contains(string(m), series)
	})
	for i := range 5 {
		if code, body, err := ready(); err != nil || code != 200 {
			t.Fatalf("/ready with 600 idle connections open (try %d): %d %q %v", i, code, body, err)
		}
	}
}

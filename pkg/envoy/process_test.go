package envoy

import (
	"context"
	"encoding/json"
	"log/slog"
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
	p := &Process{
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

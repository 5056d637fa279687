//go:build linux

package e2e_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The daemon supervising a real Envoy, as an operator runs it: Envoy killed, the daemon stopped,
// and a configuration Envoy refuses. Each reports its figure in the test log.

// envoyPID is the pid of the Envoy the daemon started with the bootstrap in e.dir.
func (e *env) envoyPID() (int, error) {
	boot := filepath.Join(e.dir, "envoy-bootstrap.json")
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		return 0, err
	}
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(boot)) {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err == nil {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no process runs with bootstrap %s", boot)
}

// TestEnvoyKilledIsRestarted: SIGKILL to Envoy under load; the daemon restarts it (backoff from
// 1s) with the same bootstrap, it takes its configuration over ADS again and serves.
func TestEnvoyKilledIsRestarted(t *testing.T) {
	e := start(t, goMesh, envoyDataplane(t))
	pid, err := e.envoyPID()
	if err != nil {
		t.Fatal(err)
	}
	l := e.startLoad()
	l.progress(t, 20)
	okBefore := l.ok.Load()
	killed := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Serving again: a new Envoy process, and requests succeeding through it.
	var newPID int
	e.eventually("a new envoy process", func() error {
		p, err := e.envoyPID()
		if err != nil {
			return err
		}
		if p == pid {
			return fmt.Errorf("still pid %d", p)
		}
		newPID = p
		return nil
	})
	var gap time.Duration
	e.eventually("requests served by the restarted envoy", func() error {
		code, r, err := e.get("", "productpage.bookinfo.svc.cluster.local", e.ports.http, "/")
		if err != nil || code != 200 {
			return fmt.Errorf("%d %v", code, err)
		}
		e.checkReport("after restart", r, "productpage", target("productpage", e.ports.http, ""), alpnHTTP)
		gap = time.Since(killed)
		return nil
	})
	l.progress(t, 20)
	l.halt()
	if !strings.Contains(e.logs.String(), "envoy exited; restarting") {
		t.Error("the daemon did not log Envoy's exit")
	}
	t.Logf("envoy SIGKILL (pid %d -> %d): serving again after %.2fs; load: %d ok before the kill, %d ok and %d failed in all",
		pid, newPID, gap.Seconds(), okBefore, l.ok.Load(), l.failed.Load())
}

// TestEnvoyDrainsOnShutdown: requests in flight when the daemon is told to stop complete; the
// daemon drains Envoy's listeners, waits the drain time, then stops it.
func TestEnvoyDrainsOnShutdown(t *testing.T) {
	const inFlight = 8
	e := start(t, goMesh, envoyDrainingFor(t, 4*time.Second))
	pid, err := e.envoyPID()
	if err != nil {
		t.Fatal(err)
	}
	st, _ := e.mesh.stats("productpage")
	served := st.Served
	var wg sync.WaitGroup
	results := make(chan string, inFlight)
	for i := range inFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A fresh client: a keep-alive connection is what a drain must close gracefully.
			c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{}}
			defer c.CloseIdleConnections()
			req, _ := http.NewRequest("GET", "http://127.0.0.1:"+strconv.Itoa(e.ports.http)+"/slow?delay=2s&i="+strconv.Itoa(i), nil)
			req.Host = "productpage.bookinfo.svc.cluster.local"
			resp, err := c.Do(req)
			if err != nil {
				results <- err.Error()
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.Contains(string(body), "path=/slow") {
				results <- fmt.Sprintf("%s: %s", resp.Status, body)
				return
			}
			results <- ""
		}()
	}
	// Every request reached the application before the daemon is told to stop.
	e.eventually("requests in flight at the application", func() error {
		if st, _ := e.mesh.stats("productpage"); st.Served-served < inFlight {
			return fmt.Errorf("%d of %d arrived", st.Served-served, inFlight)
		}
		return nil
	})
	stopping := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- e.stop() }()
	wg.Wait()
	close(results)
	failed := 0
	for r := range results {
		if r != "" {
			failed++
			t.Errorf("request in flight during the drain: %s", r)
		}
	}
	completed := time.Since(stopping)
	if err := <-stopped; err != nil {
		t.Fatalf("daemon: %v", err)
	}
	took := time.Since(stopping)
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("envoy pid %d still runs after the daemon stopped", pid)
	}
	// After the drain, nothing listens on the service port.
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(e.ports.http), time.Second); err == nil {
		c.Close()
		t.Error("the HTTP port still accepts connections after the daemon stopped")
	}
	if !strings.Contains(e.logs.String(), "draining envoy") {
		t.Error("the daemon did not log the drain")
	}
	t.Logf("daemon stop with %d requests in flight (2s each): %d completed, %d failed; last one done %.2fs after the stop, daemon and envoy gone after %.2fs (drain time 4s)",
		inFlight, inFlight-failed, failed, completed.Seconds(), took.Seconds())
}

// TestEnvoyNACK: a listener Envoy cannot bind (its port is taken) is refused by Envoy; the daemon
// logs Envoy's own message and counts the NACK, the rest of the configuration is still served,
// and /ready stays 200 on the earlier configuration (see README, Operations).
func TestEnvoyNACK(t *testing.T) {
	e := start(t, goMesh, envoyDataplane(t))
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	cat, err := os.ReadFile(e.catalog)
	if err != nil {
		t.Fatal(err)
	}
	e.replaceCatalog(string(cat) + fmt.Sprintf("  - host: blocked.bookinfo.svc.cluster.local\n    ports: [{number: %d, protocol: tcp}]\n    identities: [%s]\n", port, mysqlID))
	e.eventually("envoy's rejection logged and counted", func() error {
		logs := e.logs.String()
		if !strings.Contains(logs, "rejected configuration") || !strings.Contains(logs, strconv.Itoa(port)) {
			return fmt.Errorf("no log line reports the rejected listener on port %d", port)
		}
		if n := e.metric("fwdproxy_xds_nacks_total", `type="listener"`); n < 1 {
			return fmt.Errorf("fwdproxy_xds_nacks_total{type=\"listener\"} = %v", n)
		}
		return nil
	})
	for _, line := range strings.Split(e.logs.String(), "\n") {
		if strings.Contains(line, "rejected configuration") {
			t.Logf("daemon log: %s", line)
			if !strings.Contains(strings.ToLower(line), "address already in use") && !strings.Contains(line, "cannot bind") {
				t.Errorf("the NACK log line does not carry Envoy's own message: %s", line)
			}
			break
		}
	}
	if code, r, err := e.get("", "productpage.bookinfo.svc.cluster.local", e.ports.http, "/"); err != nil || code != 200 {
		t.Errorf("productpage after the NACK: %d %v %v", code, err, r.Fields)
	}
	if _, err := e.tcp(""); err != nil {
		t.Errorf("mysql after the NACK: %v", err)
	}
	resp, err := http.Get("http://" + e.metrics + "/ready")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "earlier configuration") {
		t.Errorf("/ready after the NACK: %d %s; want 200 ready on an earlier configuration", resp.StatusCode, body)
	}
}

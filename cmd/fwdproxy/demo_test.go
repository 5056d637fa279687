package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// TestDemo runs the built binary's demo with free ports, then runs the commands it prints against
// it, as printed.
func TestDemo(t *testing.T) {
	cmd := exec.Command(binary, "demo", "--http-port", "0", "--tcp-port", "0", "--log-level", "error")
	pr, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr meshtest.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
		}
	}()

	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		done <- cmd.Wait()
	}()
	var printed []string
	timeout := time.After(60 * time.Second)
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("demo ended before it was ready: %v\n%s\n%s", <-done, strings.Join(printed, "\n"), stderr.String())
			}
			printed = append(printed, l)
			if strings.HasPrefix(l, "Press Ctrl-C") {
				break wait
			}
		case <-timeout:
			t.Fatalf("demo not ready after 60s:\n%s", strings.Join(printed, "\n"))
		}
	}
	out := strings.Join(printed, "\n")
	dir := regexp.MustCompile(`Files: (\S+)`).FindStringSubmatch(out)
	if dir == nil {
		t.Fatalf("no files directory printed:\n%s", out)
	}

	curlRe := regexp.MustCompile(`^\s*curl -sS -H 'Host: ([^']+)' (http://\S+)$`)
	want := map[string]string{
		"productpage.bookinfo.svc.cluster.local": "productpage",
		"productpage.example.internal":           "productpage",
		"reviews.bookinfo.svc.cluster.local":     "reviews-v1",
		"reviews-v2.example.internal":            "reviews-v2",
	}
	_, haveCurl := exec.LookPath("curl")
	tried := 0
	for _, l := range printed {
		m := curlRe.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		tried++
		host, url := m[1], m[2]
		req, _ := http.NewRequest("GET", url, nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", l, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: status %d: %s", l, resp.StatusCode, body)
		}
		checkDemoReport(t, l, string(body), want[host])
		if haveCurl == nil { // the exact printed command, too
			got, err := exec.Command("sh", "-c", strings.TrimSpace(l)).Output()
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			checkDemoReport(t, l, string(got), want[host])
		}
	}
	if tried != len(want) {
		t.Errorf("ran %d curl commands, want %d:\n%s", tried, len(want), out)
	}

	// The TCP service, with the nc command as printed (nc comes with scripts/test-deps).
	ncLine := regexp.MustCompile(`(?m)^  (echo hello \| nc -q 2 \S+ \d+)$`).FindStringSubmatch(out)
	if ncLine == nil {
		t.Fatalf("no nc command printed:\n%s", out)
	}
	if _, err := exec.LookPath("nc"); err != nil {
		t.Fatalf("nc is not installed (scripts/test-deps installs netcat-openbsd): %v", err)
	}
	got, err := exec.Command("sh", "-c", ncLine[1]).Output()
	if err != nil {
		t.Fatalf("%s: %v", ncLine[1], err)
	}
	first, rest, _ := strings.Cut(string(got), "\n")
	checkDemoReport(t, "nc", first, "echo")
	if rest != "hello\n" {
		t.Errorf("echo: got %q", rest)
	}

	metrics := regexp.MustCompile(`curl -sS (http://\S+/metrics)`).FindStringSubmatch(out)
	if metrics == nil {
		t.Fatalf("no metrics command printed:\n%s", out)
	}
	resp, err := http.Get(metrics[1])
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "fwdproxy_catalog_services 4") {
		t.Errorf("metrics lack fwdproxy_catalog_services 4")
	}

	// The printed status, render and validate commands work as printed: this binary's real path,
	// the demo's config.
	self := regexp.QuoteMeta(binary)
	for _, c := range []struct{ verb, want string }{
		{"status", "demo (alone (gossip off))"},
		{"render", `"listeners"`},
		{"validate", "ok: 4 services"},
	} {
		m := regexp.MustCompile(`(?m)^  (` + self + ` ` + c.verb + ` --config \S+)$`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no %s command with the binary's path printed:\n%s", c.verb, out)
		}
		got, err := exec.Command("sh", "-c", m[1]).CombinedOutput()
		if err != nil || !strings.Contains(string(got), c.want) {
			t.Errorf("%s: %v\n%s", m[1], err, got)
		}
		if c.verb == "status" && !strings.Contains(string(got), "services:            4 served, 0 skipped") {
			t.Errorf("status lacks the services' state:\n%s", got)
		}
	}

	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("demo exited with %v\n%s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("demo did not stop within 20s of SIGINT")
	}
	if _, err := os.Stat(dir[1]); !os.IsNotExist(err) {
		t.Errorf("demo left its files in %s (%v)", dir[1], err)
	}
}

// TestDemoPortInUse: a port already taken fails the demo at once, naming the flag and the cause.
func TestDemoPortInUse(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	port := lis.Addr().(*net.TCPAddr).Port
	_, stderr, err := run(t, "demo", "--http-port", fmt.Sprint(port), "--tcp-port", "0")
	want := fmt.Sprintf("--http-port %d: cannot listen on 127.0.0.1:%d: listen tcp 127.0.0.1:%d: bind: address already in use", port, port, port)
	if exitCode(err) != 1 || !strings.Contains(stderr, want) || !strings.Contains(stderr, "--http-port 0 for any free one") {
		t.Fatalf("exit %d, stderr lacks %q:\n%s", exitCode(err), want, stderr)
	}
}

func checkDemoReport(t *testing.T, cmd, line, service string) {
	t.Helper()
	r, err := meshtest.ParseReport(line)
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	if r.Service != service || r.Caller != demoFleetID || !r.Verified || !strings.HasPrefix(r.SNI, "outbound_.") {
		t.Errorf("%s: report %+v, want service %s called by %s", cmd, r, service, demoFleetID)
	}
}

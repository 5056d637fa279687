package main

import (
	"bufio"
	"context"
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

// TestDemo runs the demo with free ports, then runs the commands it prints against it.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := runDemo(ctx, demoOptions{HTTPPort: 0, TCPPort: 0, LogLevel: "error"}, pw)
		pw.CloseWithError(io.EOF)
		done <- err
	}()

	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var printed []string
	timeout := time.After(60 * time.Second)
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("demo ended before it was ready: %v\n%s", <-done, strings.Join(printed, "\n"))
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

	nc := regexp.MustCompile(`nc -q 2 (\S+) (\d+)`).FindStringSubmatch(out)
	if nc == nil {
		t.Fatalf("no nc command printed:\n%s", out)
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort(nc[1], nc[2]), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "hello\n")
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil {
		t.Fatal(err)
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

	// The printed status command reaches the admin API on its socket in the demo's directory.
	status := regexp.MustCompile(`fwdproxy status --config (\S+)`).FindStringSubmatch(out)
	if status == nil {
		t.Fatalf("no status command printed:\n%s", out)
	}
	if got, err := exec.Command(binary, "status", "--config", status[1]).CombinedOutput(); err != nil ||
		!strings.Contains(string(got), "demo (alone (gossip off))") || !strings.Contains(string(got), "yes (ready)") {
		t.Errorf("fwdproxy status: %v\n%s", err, got)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("demo returned %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("demo did not stop within 20s of cancel")
	}
	if _, err := os.Stat(dir[1]); !os.IsNotExist(err) {
		t.Errorf("demo left its files in %s (%v)", dir[1], err)
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

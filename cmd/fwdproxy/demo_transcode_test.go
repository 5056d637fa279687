package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDemoTranscoding runs the REST/JSON commands the demo prints against the transcoded gRPC
// service.
func TestDemoTranscoding(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := runDemo(ctx, demoOptions{HTTPPort: 0, TCPPort: 0, LogLevel: "error"}, pw)
		pw.CloseWithError(io.EOF)
		done <- err
	}()
	defer func() {
		cancel()
		go func() { _, _ = io.Copy(io.Discard, pr) }()
		if err := <-done; err != nil {
			t.Errorf("demo: %v", err)
		}
	}()
	var printed []string
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(60 * time.Second)
	for ready := false; !ready; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("demo ended before it was ready:\n%s", strings.Join(printed, "\n"))
			}
			printed = append(printed, l)
			ready = strings.HasPrefix(l, "Press Ctrl-C")
		case <-timeout:
			t.Fatalf("demo not ready after 60s:\n%s", strings.Join(printed, "\n"))
		}
	}
	go func() {
		for range lines {
		}
	}()
	re := regexp.MustCompile(`^\s*curl -sS (?:-X (\w+) )?'?(http://[^' ]+)'? -H 'Host: ([^']+)'(?: -d '(.*)')?$`)
	want := []string{`"id":"42"`, `"displayName":"Dune"`, `[{"shelf":"demo","id":"0"`}
	ran := 0
	for _, l := range printed {
		m := re.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		method := m[1]
		if method == "" {
			method = "GET"
		}
		req, _ := http.NewRequest(method, m[2], strings.NewReader(m[4]))
		req.Host = m[3]
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", l, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !json.Valid(body) || ran >= len(want) || !strings.Contains(string(body), want[ran]) {
			t.Errorf("%s: %d %s", l, resp.StatusCode, body)
		}
		if _, err := exec.LookPath("curl"); err == nil && ran < len(want) { // the exact printed command, too
			got, err := exec.Command("sh", "-c", strings.TrimSpace(l)).Output()
			if err != nil || !strings.Contains(string(got), want[ran]) {
				t.Errorf("%s: %v %s", l, err, got)
			}
		}
		ran++
	}
	if ran != len(want) {
		t.Errorf("ran %d transcoded commands, want %d:\n%s", ran, len(want), strings.Join(printed, "\n"))
	}
}

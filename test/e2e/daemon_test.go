//go:build linux

package e2e_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
)

// The daemon setup every scenario shares: the fleet certificate, the config file, the daemon run
// in the test's process, its log, and waiting for it to serve.

// writeFleetCert issues the fleet certificate from ca, valid for ttl, into certs (made 0700)
// as cert-chain.pem, key.pem and root-cert.pem.
func writeFleetCert(t testing.TB, ca *meshtest.CA, certs string, ttl time.Duration) *meshtest.Leaf {
	t.Helper()
	if err := os.MkdirAll(certs, 0o700); err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor(fleetID, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(certs, ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	return leaf
}

// runningDaemon is a daemon run by a test.
type runningDaemon struct {
	d    *daemon.Daemon
	logs *meshtest.SyncBuffer
	// logTail is how much of the log a failure shows (0: all of it).
	logTail int
	done    chan error // Run's result; put back by whoever takes it before stop
	// stop ends the daemon (once) and returns what Run returned.
	stop func() error
}

// runDaemon writes cfgYAML to dir/config.yaml, loads it and runs the daemon, logging into logs
// at level. When the test ends the daemon is stopped (an error if it takes longer than
// stopWithin or Run failed) and, if the test failed, the last logTail bytes of its log shown.
func runDaemon(t testing.TB, dir, cfgYAML string, logs *meshtest.SyncBuffer, level slog.Level, stopWithin time.Duration, logTail int) *runningDaemon {
	t.Helper()
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	r := &runningDaemon{d: daemon.New(cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: level}))), logs: logs, logTail: logTail, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { r.done <- r.d.Run(ctx) }()
	var once sync.Once
	var stopErr error
	r.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case stopErr = <-r.done:
			case <-time.After(stopWithin):
				stopErr = fmt.Errorf("daemon did not stop within %v", stopWithin)
			}
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Errorf("daemon: %v", err)
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(logs.String(), logTail))
		}
	})
	return r
}

// await polls check every pace until it returns nil, failing the test when the daemon stops
// first or after limit.
func (r *runningDaemon) await(t testing.TB, limit, pace time.Duration, what string, check func() error) {
	t.Helper()
	why := errors.New("not checked yet")
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); {
		select {
		case err := <-r.done:
			r.done <- err // for stop; the cleanup shows the log
			t.Fatalf("daemon stopped: %v", err)
		case <-time.After(pace):
		}
		if why = check(); why == nil {
			return
		}
	}
	t.Fatalf("%s: not after %v: %v", what, limit, why)
}

// rotateFleetCert writes a new fleet certificate over the served one and waits until it is
// presented upstream: each TCP connection is a new TLS session, which must carry the new leaf.
func (e *env) rotateFleetCert() {
	e.t.Helper()
	leaf := writeFleetCert(e.t, e.ca, e.certs, 2*time.Hour)
	e.fleetLeaf = leaf.Cert
	want := leaf.Cert.SerialNumber.Text(16)
	e.eventually("new certificate presented", func() error {
		r, err := e.tcp("")
		if err != nil {
			return err
		}
		if r.Serial != want {
			return fmt.Errorf("sidecar saw serial %s, want %s", r.Serial, want)
		}
		return nil
	})
}

// eventually retries f for up to 20s.
func eventually(t testing.TB, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not after 20s: %v", what, err)
}

func tail(s string, n int) string {
	if n <= 0 || len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}

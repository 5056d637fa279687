// Package envoy supervises the Envoy process that serves as the data plane (dataplane: envoy):
// it writes the bootstrap that points Envoy at the daemon's xDS socket, restarts Envoy whenever
// it exits, and drains it on shutdown.
package envoy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/backoff"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// dialable turns a listen address into one to connect to: an unspecified host becomes loopback.
func dialable(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return net.JoinHostPort(host, port)
}

// Process supervises one Envoy: it starts it, restarts it with backoff whenever it exits,
// and on shutdown asks it to drain its listeners, waits the drain time, then sends SIGTERM
// (and SIGKILL if it does not exit).
type Process struct {
	Binary        string
	BootstrapPath string
	AdminAddress  string
	DrainTime     time.Duration
	Args          []string
	// SotW has Envoy subscribe with state-of-the-world ADS (envoy.xdsProtocol: sotw).
	SotW bool
	Log  *slog.Logger
	// MinBackoff and MaxBackoff bound the wait before a restart; defaults 1s and 30s.
	MinBackoff, MaxBackoff time.Duration
	// StopTimeout is how long Envoy may take to exit after SIGTERM; default 10s.
	StopTimeout time.Duration

	starts atomic.Int64
}

// WriteBootstrap writes the bootstrap that points Envoy at the daemon's xDS socket. It holds
// no secret (certificates come over SDS), so it is world-readable.
func (p *Process) WriteBootstrap(nodeID, nodeCluster, xdsSocket string) error {
	b, err := controlplane.Bootstrap(controlplane.BootstrapOptions{
		NodeID: nodeID, NodeCluster: nodeCluster, XDSSocket: xdsSocket, AdminAddress: p.AdminAddress, SotW: p.SotW,
	})
	if err != nil {
		return fmt.Errorf("envoy bootstrap: %w", err)
	}
	js, err := controlplane.MarshalJSON(b)
	if err != nil {
		return fmt.Errorf("envoy bootstrap: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(p.BootstrapPath), 0o755); err != nil {
		return fmt.Errorf("envoy.bootstrapPath: %w", err)
	}
	tmp := p.BootstrapPath + ".tmp"
	if err := os.WriteFile(tmp, append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("envoy.bootstrapPath: %w", err)
	}
	if err := os.Rename(tmp, p.BootstrapPath); err != nil {
		return fmt.Errorf("envoy.bootstrapPath: %w", err)
	}
	return nil
}

func (p *Process) args() []string {
	secs := int((p.DrainTime + time.Second - 1) / time.Second)
	args := []string{"-c", p.BootstrapPath, "--drain-time-s", strconv.Itoa(secs)}
	// The daemon restarts Envoy itself. Hot restart's shared memory (base id 0) would only make a
	// second Envoy on the host fail to start, unless the operator chose a base id.
	if !slices.ContainsFunc(p.Args, func(a string) bool {
		return strings.HasPrefix(a, "--base-id") || strings.HasPrefix(a, "--use-dynamic-base-id") || strings.HasPrefix(a, "--restart-epoch") || a == "--disable-hot-restart"
	}) {
		args = append(args, "--disable-hot-restart")
	}
	return append(args, p.Args...)
}

// Run keeps Envoy running until ctx ends, then stops it gracefully.
func (p *Process) Run(ctx context.Context) error {
	minB, maxB := p.MinBackoff, p.MaxBackoff
	if minB <= 0 {
		minB = time.Second
	}
	if maxB <= 0 {
		maxB = 30 * time.Second
	}
	bo := backoff.New(backoff.Spread(minB, maxB))
	for {
		started := time.Now()
		cmd := exec.Command(p.Binary, p.args()...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		var retry time.Duration
		if err := cmd.Start(); err != nil {
			retry = bo.Next()
			p.Log.Error("cannot start envoy; retrying", "binary", p.Binary, "error", err, "retry_in", retry.String())
		} else {
			n := p.starts.Add(1)
			p.Log.Info("envoy started", "pid", cmd.Process.Pid, "start", n, "bootstrap", p.BootstrapPath)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				ran := time.Since(started)
				if ran > time.Minute {
					bo.Reset() // it ran fine for a while: restart promptly
				}
				retry = bo.Next()
				p.Log.Error("envoy exited; restarting", "pid", cmd.Process.Pid, "exit", exitString(err),
					"ran_for", ran.Round(time.Millisecond).String(), "retry_in", retry.String())
			case <-ctx.Done():
				p.stop(cmd, done)
				return nil
			}
		}
		if !backoff.Sleep(ctx, retry) {
			return nil
		}
	}
}

// stop drains Envoy's listeners through its admin API, gives connections the drain time, then
// sends SIGTERM, and SIGKILL after StopTimeout.
func (p *Process) stop(cmd *exec.Cmd, done <-chan error) {
	pid := cmd.Process.Pid
	p.Log.Info("draining envoy", "pid", pid, "drain_time", p.DrainTime.String())
	if err := p.drainListeners(); err != nil {
		p.Log.Warn("cannot ask envoy to drain; stopping it anyway after the drain time", "error", err)
	}
	select {
	case err := <-done:
		p.Log.Info("envoy exited while draining", "pid", pid, "exit", exitString(err))
		return
	case <-time.After(p.DrainTime):
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	timeout := p.StopTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	select {
	case err := <-done:
		p.Log.Info("envoy stopped", "pid", pid, "exit", exitString(err))
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		err := <-done
		p.Log.Warn("envoy did not exit after SIGTERM; killed", "pid", pid, "exit", exitString(err))
	}
}

func (p *Process) drainListeners() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+dialable(p.AdminAddress)+"/drain_listeners?graceful", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("admin /drain_listeners answered %s", resp.Status)
	}
	return nil
}

func exitString(err error) string {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return "exit status 0"
	case errors.As(err, &ee):
		return ee.ProcessState.String()
	}
	return err.Error()
}

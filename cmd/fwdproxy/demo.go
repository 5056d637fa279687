package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
)

func init() { commands = append(commands, newDemoCmd) }

// demoOptions are the demo's ports (0: any free port) and where it keeps its files.
type demoOptions struct {
	Listen      string
	HTTPPort    int
	TCPPort     int
	GatewayPort int
	MetricsPort int
	// Dir keeps the generated files (kept afterwards); empty: a temporary directory, removed.
	Dir      string
	LogLevel string
}

// The demo's mesh: Bookinfo-like HTTP services and a TCP echo service.
const (
	demoFleetID       = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	demoProductpageID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
	demoReviewsID     = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
	demoEchoID        = "spiffe://cluster.local/ns/demo/sa/echo"
	// The gRPC service transcoded for REST/JSON clients, on the HTTP port (routed by Host).
	demoItemsHost = "items.demo.svc.cluster.local"
	demoItemsID   = "spiffe://cluster.local/ns/demo/sa/items"
)

func newDemoCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a self-contained demo on loopback: a stand-in mesh, the daemon and its built-in data plane",
		Long: `Run a self-contained demo on loopback: a stand-in Istio mesh (a CA, an east-west gateway in
AUTO_PASSTHROUGH mode, sidecars that require mTLS) and the fwdproxy daemon with its built-in
data plane. It prints commands to try against it, and runs until Ctrl-C. Nothing outside this
machine is touched.`,
		Example: `  fwdproxy demo
  fwdproxy demo --http-port 0 --tcp-port 0 --dir /tmp/fwdproxy-demo`,
		Args: noArgs,
	}
	var o demoOptions
	fs := cmd.Flags()
	fs.StringVar(&o.Listen, "listen", "127.0.0.1", "address the demo's service ports listen on")
	fs.IntVar(&o.HTTPPort, "http-port", 9080, "port of the HTTP services (routed by Host); 0: any free port")
	fs.IntVar(&o.TCPPort, "tcp-port", 9000, "port of the TCP echo service; 0: any free port")
	fs.IntVar(&o.GatewayPort, "gateway-port", 0, "port of the stand-in east-west gateway; 0: any free port")
	fs.IntVar(&o.MetricsPort, "metrics-port", 0, "port of /metrics, /ready and /healthz; 0: any free port")
	fs.StringVar(&o.Dir, "dir", "", "keep the generated CA, identities, config and catalog in this directory, where the daemon's xDS and admin sockets go too (default: a temporary directory, removed on exit)")
	fs.StringVar(&o.LogLevel, "log-level", "warn", "daemon log level: debug, info, warn, error")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return runDemo(ctx, o, cmd.OutOrStdout())
	}
	return cmd
}

// runDemo starts the stand-in mesh and the daemon, prints what to try on out, and serves until
// ctx ends; then it stops everything and removes its temporary files.
func runDemo(ctx context.Context, o demoOptions, out io.Writer) error {
	log, err := newLogger("text", o.LogLevel)
	if err != nil {
		return err
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1"
	}
	if net.ParseIP(o.Listen) == nil {
		return fmt.Errorf("--listen %q: use an IP address such as 127.0.0.1", o.Listen)
	}
	for _, p := range []struct {
		flag string
		port *int
	}{{"--http-port", &o.HTTPPort}, {"--tcp-port", &o.TCPPort}, {"--gateway-port", &o.GatewayPort}, {"--metrics-port", &o.MetricsPort}} {
		if *p.port < 0 || *p.port > 65535 {
			return fmt.Errorf("%s %d: use 1-65535, or 0 for any free port", p.flag, *p.port)
		}
		if *p.port == 0 {
			if *p.port, err = meshtest.FreePort(); err != nil {
				return err
			}
		}
	}
	if o.HTTPPort == o.TCPPort {
		return fmt.Errorf("--http-port and --tcp-port are both %d; use two ports", o.HTTPPort)
	}
	// The data plane binds the service ports only once the daemon runs; a port taken by something
	// else would surface as a demo that never becomes ready. Find out now, and say so.
	for _, p := range []struct {
		flag, host string
		port       int
	}{{"--http-port", o.Listen, o.HTTPPort}, {"--tcp-port", o.Listen, o.TCPPort}, {"--gateway-port", "127.0.0.1", o.GatewayPort}, {"--metrics-port", "127.0.0.1", o.MetricsPort}} {
		addr := net.JoinHostPort(p.host, strconv.Itoa(p.port))
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("%s %d: cannot listen on %s: %w; stop what listens there (ss -ltnp 'sport = :%d' shows it) or choose another port, e.g. %s 0 for any free one", p.flag, p.port, addr, err, p.port, p.flag)
		}
		lis.Close()
	}

	dir := o.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "fwdproxy-demo-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}

	// The mesh side: a CA like Istio's, the east-west gateway, the sidecars.
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		return err
	}
	gw, err := meshtest.StartGateway(net.JoinHostPort("127.0.0.1", strconv.Itoa(o.GatewayPort)))
	if err != nil {
		return fmt.Errorf("--gateway-port %d: %w", o.GatewayPort, err)
	}
	defer gw.Close()
	sidecars := []struct {
		opts   meshtest.SidecarOptions
		target meshtest.Target
	}{
		{meshtest.SidecarOptions{Name: "productpage", SPIFFEID: demoProductpageID, Protocol: meshtest.HTTP},
			meshtest.Target{Host: "productpage.bookinfo.svc.cluster.local", Port: uint32(o.HTTPPort)}},
		{meshtest.SidecarOptions{Name: "reviews-v1", SPIFFEID: demoReviewsID, Protocol: meshtest.HTTP},
			meshtest.Target{Host: "reviews.bookinfo.svc.cluster.local", Port: uint32(o.HTTPPort)}},
		{meshtest.SidecarOptions{Name: "reviews-v2", SPIFFEID: demoReviewsID, Protocol: meshtest.HTTP},
			meshtest.Target{Host: "reviews.bookinfo.svc.cluster.local", Port: uint32(o.HTTPPort), Subset: "v2"}},
		{meshtest.SidecarOptions{Name: "echo", SPIFFEID: demoEchoID, Protocol: meshtest.TCP},
			meshtest.Target{Host: "echo.demo.svc.cluster.local", Port: uint32(o.TCPPort)}},
		{meshtest.SidecarOptions{Name: "items", SPIFFEID: demoItemsID, Protocol: meshtest.GRPC},
			meshtest.Target{Host: demoItemsHost, Port: uint32(o.HTTPPort)}},
	}
	for _, sc := range sidecars {
		sc.opts.CA = ca
		s, err := meshtest.StartSidecar(sc.opts)
		if err != nil {
			return err
		}
		defer s.Close()
		gw.Route(sc.target, s.Addr())
	}

	// The fleet side: its identity, catalog and config, then the daemon.
	certs := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certs, 0o700); err != nil {
		return err
	}
	leaf, err := ca.IssueFor(demoFleetID, 24*time.Hour)
	if err != nil {
		return err
	}
	if _, _, _, err := leaf.WriteFiles(certs, ca.RootPEM); err != nil {
		return err
	}
	// The items service's descriptor set, as protoc --include_imports --descriptor_set_out writes
	// it, for its transcoding.
	itemsSet, err := meshtest.EchoDescriptorSet()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "items.pb"), itemsSet, 0o644); err != nil {
		return err
	}
	catalogYAML := demoCatalog(o)
	gwHost, gwPort, _ := net.SplitHostPort(gw.Addr())
	metricsAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(o.MetricsPort))
	configYAML := fmt.Sprintf(`# fwdproxy demo configuration (see examples/config.yaml for every field).
node: {id: demo}
gateways:
  - {name: eastwest, address: %s, port: %s}
identity:
  spiffeID: %s
  files: {certChain: certs/cert-chain.pem, privateKey: certs/key.pem, roots: certs/root-cert.pem}
discovery:
  files: [catalog.yaml]
listen: {address: %s}
# The built-in data plane takes its configuration in process; the xDS socket is for another
# data plane on this host (fwdproxy dataplane --xds), the admin socket for fwdproxy status.
# Only root and this user may connect to either.
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
dataplane: builtin
`, gwHost, gwPort, demoFleetID, o.Listen, metricsAddr)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte(catalogYAML), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(cfgPath, []byte(configYAML), 0o644); err != nil {
		return err
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- daemon.New(cfg, log).Run(ctx) }()
	if err := waitDemoReady(ctx, done, metricsAddr, net.JoinHostPort(o.Listen, strconv.Itoa(o.HTTPPort))); err != nil {
		cancel()
		return err
	}

	host := o.Listen
	if host == "0.0.0.0" {
		host = "127.0.0.1"
	}
	httpURL := "http://" + net.JoinHostPort(host, strconv.Itoa(o.HTTPPort))
	self := demoBinary()
	nc := fmt.Sprintf("echo hello | nc -q 2 %s %d", host, o.TCPPort)
	if _, err := exec.LookPath("nc"); err != nil {
		nc += "    # nc is not installed: apt-get install netcat-openbsd"
	}
	fmt.Fprintf(out, `fwdproxy demo is running: a stand-in Istio mesh (east-west gateway %s in AUTO_PASSTHROUGH
mode, sidecars that require mTLS from a client chained to the mesh root) and the fwdproxy daemon
with its built-in data plane, all on loopback. Files: %s

Try (each answer shows the identity, SNI and ALPN the sidecar saw):
  curl -sS -H 'Host: productpage.bookinfo.svc.cluster.local' %[3]s/productpage
  curl -sS -H 'Host: productpage.example.internal' %[3]s/
  curl -sS -H 'Host: reviews.bookinfo.svc.cluster.local' %[3]s/reviews/1
  curl -sS -H 'Host: reviews-v2.example.internal' %[3]s/reviews/1
  %[4]s

REST/JSON to the gRPC service %[9]s (transcoded by the fleet; its API: fwdproxy's
internal/meshtest/testdata/echo.proto):
  curl -sS '%[3]s/v1/shelves/demo/items/42?kind=KIND_BOOK' -H 'Host: %[9]s'
  curl -sS -X POST %[3]s/v1/shelves/demo/items -H 'Host: %[9]s' -d '{"displayName":"Dune"}'
  curl -sS '%[3]s/v1/shelves/demo/items?count=3' -H 'Host: %[9]s'

  curl -sS http://%[5]s/metrics | grep '^fwdproxy_'

What the daemon serves and how it is doing (its config is %[6]s):
  %[7]s status --config %[6]s
  %[7]s render --config %[6]s
  %[7]s validate --config %[6]s
%[8]s
Press Ctrl-C to stop.
`, gw.Addr(), dir, httpURL, nc, metricsAddr, cfgPath, self.path, self.note, demoItemsHost)

	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("daemon: %w", err)
		}
		return nil
	case <-ctx.Done():
	}
	cancel()
	select {
	case err := <-done:
		fmt.Fprintln(out, "fwdproxy demo stopped.")
		return err
	case <-time.After(10 * time.Second):
		return errors.New("daemon did not stop within 10s")
	}
}

// demoSelf is how the printed commands name this binary.
type demoSelf struct{ path, note string }

// demoBinary is this binary's real path, since "fwdproxy" need not be on PATH; a binary that go
// run built in a temporary directory is gone once the demo stops, so the note says how to keep one.
func demoBinary() demoSelf {
	p, err := os.Executable()
	if err != nil {
		return demoSelf{path: "fwdproxy", note: "(fwdproxy: install it with go install ./cmd/fwdproxy, or make build for bin/fwdproxy)\n"}
	}
	if strings.Contains(p, string(filepath.Separator)+"go-build") {
		return demoSelf{path: p, note: "(" + p + " is go run's temporary build, removed when the demo stops; to keep\n one: go install ./cmd/fwdproxy, or make build for bin/fwdproxy)\n"}
	}
	return demoSelf{path: p}
}

// waitDemoReady waits until the daemon reports ready and the HTTP port accepts.
func waitDemoReady(ctx context.Context, done <-chan error, metricsAddr, httpAddr string) error {
	deadline := time.Now().Add(30 * time.Second)
	client := &http.Client{Timeout: time.Second}
	why := "not started"
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			if err == nil {
				err = errors.New("stopped")
			}
			return fmt.Errorf("daemon: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := client.Get("http://" + metricsAddr + "/ready")
		if err != nil {
			why = err.Error()
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		why = string(body)
		if resp.StatusCode != http.StatusOK {
			continue
		}
		c, err := net.DialTimeout("tcp", httpAddr, time.Second)
		if err != nil {
			why = "data plane not listening on " + httpAddr + ": " + err.Error()
			continue
		}
		c.Close()
		return nil
	}
	return fmt.Errorf("demo not ready after 30s: %s", why)
}

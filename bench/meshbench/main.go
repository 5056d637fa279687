// Command meshbench supports bench/dataplane.sh: it runs the stand-in mesh the data-path
// benchmark forwards into (mesh), and measures new TCP connections per second (tcpload).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

const (
	fleetID       = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	productpageID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
	echoID        = "spiffe://cluster.local/ns/bench/sa/echo"
	httpHost      = "productpage.bookinfo.svc.cluster.local"
	tcpHost       = "echo.bench.svc.cluster.local"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: meshbench mesh|tcpload [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "mesh":
		err = meshCmd(os.Args[2:])
	case "tcpload":
		err = tcpLoadCmd(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: use mesh or tcpload", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "meshbench:", err)
		os.Exit(1)
	}
}

// meshCmd starts a gateway, an HTTP sidecar and a TCP sidecar, plus plain-text twins of their
// applications for the direct baseline, and writes into -dir: the fleet identity (certs/),
// fwdproxy's config.yaml and catalog.yaml (dataplane: builtin), with -envoy also
// config-envoy.yaml and catalog-envoy.yaml (a second daemon with dataplane: envoy: the same two
// services on their own ports, routed by the same gateway to the same sidecars), haproxy.cfg
// doing the same TLS origination, and env.sh with the addresses. It serves until SIGINT/SIGTERM.
func meshCmd(args []string) error {
	fs := flag.NewFlagSet("mesh", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory for the generated files (required)")
	envoyBin := fs.String("envoy", "", "envoy binary: also write config-envoy.yaml, a daemon with dataplane: envoy")
	ports := map[string]*int{}
	for _, n := range []string{"fwdproxy-http", "fwdproxy-tcp", "haproxy-http", "haproxy-tcp", "metrics",
		"envoy-http", "envoy-tcp", "envoy-metrics", "envoy-proxy-admin", "b-http", "b-tcp", "b-metrics"} {
		ports[n] = fs.Int(n, 0, n+" port (0: any free port)")
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("-dir is required")
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	*dir = abs
	for n, p := range ports {
		if *p == 0 {
			var err error
			if *p, err = meshtest.FreePort(); err != nil {
				return fmt.Errorf("%s: %w", n, err)
			}
		}
	}
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		return err
	}
	gw, err := meshtest.StartGateway("127.0.0.1:0")
	if err != nil {
		return err
	}
	defer gw.Close()
	httpT := meshtest.Target{Host: httpHost, Port: uint32(*ports["fwdproxy-http"])}
	tcpT := meshtest.Target{Host: tcpHost, Port: uint32(*ports["fwdproxy-tcp"])}
	// The Envoy daemon's catalog has the same services on other ports (both daemons listen on
	// loopback), so their SNIs differ by the port only.
	envoyHTTPT := meshtest.Target{Host: httpHost, Port: uint32(*ports["envoy-http"])}
	envoyTCPT := meshtest.Target{Host: tcpHost, Port: uint32(*ports["envoy-tcp"])}
	// config-b.yaml: a second builtin daemon, the other side of an A/B run (bench/dataplane.sh
	// BUILTIN_B_ENV), on its own ports too.
	bHTTPT := meshtest.Target{Host: httpHost, Port: uint32(*ports["b-http"])}
	bTCPT := meshtest.Target{Host: tcpHost, Port: uint32(*ports["b-tcp"])}
	hs, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: "productpage", SPIFFEID: productpageID, CA: ca, Protocol: meshtest.HTTP, DNSNames: []string{httpT.SNI()}})
	if err != nil {
		return err
	}
	defer hs.Close()
	ts, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: "echo", SPIFFEID: echoID, CA: ca, Protocol: meshtest.TCP, DNSNames: []string{tcpT.SNI()}})
	if err != nil {
		return err
	}
	defer ts.Close()
	gw.Route(httpT, hs.Addr())
	gw.Route(tcpT, ts.Addr())
	gw.Route(envoyHTTPT, hs.Addr())
	gw.Route(envoyTCPT, ts.Addr())
	gw.Route(bHTTPT, hs.Addr())
	gw.Route(bTCPT, ts.Addr())

	// Direct baseline: the same applications without TLS or proxies.
	directHTTP, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	body := fmt.Sprintf("service=productpage verify=SUCCESS caller=%s serial=0 sni=%s alpn=istio-http/1.1 host=%s proto=HTTP/1.1 method=GET path=/\n", fleetID, httpT.SNI(), httpHost)
	go http.Serve(directHTTP, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, body)
	}))
	directTCP, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := directTCP.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()

	certs := filepath.Join(*dir, "certs")
	if err := os.MkdirAll(certs, 0o700); err != nil {
		return err
	}
	leaf, err := ca.IssueFor(fleetID, 24*time.Hour)
	if err != nil {
		return err
	}
	chain, key, root, err := leaf.WriteFiles(certs, ca.RootPEM)
	if err != nil {
		return err
	}
	fleetPEM := filepath.Join(certs, "fleet.pem") // HAProxy's format: chain and key in one file
	if err := os.WriteFile(fleetPEM, slices.Concat(leaf.ChainPEM, leaf.KeyPEM), 0o600); err != nil {
		return err
	}
	_ = chain
	_ = key
	gwHost, gwPort, _ := net.SplitHostPort(gw.Addr())
	catalogYAML := func(httpPort, tcpPort uint32) string {
		return fmt.Sprintf(`services:
  - host: %s
    ports: [{number: %d, protocol: http}]
    identities: [%s]
  - host: %s
    ports: [{number: %d, protocol: tcp}]
    identities: [%s]
`, httpHost, httpPort, productpageID, tcpHost, tcpPort, echoID)
	}
	configYAML := func(node, catalogFile string, metrics int, dataplane string) string {
		return fmt.Sprintf(`node: {id: %s}
gateways: [{name: eastwest, address: %s, port: %s}]
identity:
  spiffeID: %s
  files: {certChain: certs/cert-chain.pem, privateKey: certs/key.pem, roots: certs/root-cert.pem}
discovery: {files: [%s]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds-%s.sock}
metrics: {address: 127.0.0.1:%d}
admin: {socket: admin-%s.sock}
%s`, node, gwHost, gwPort, fleetID, catalogFile, node, metrics, node, dataplane)
	}
	files := map[string]string{
		"catalog.yaml": catalogYAML(httpT.Port, tcpT.Port),
		"config.yaml": configYAML("bench", "catalog.yaml", *ports["metrics"],
			"dataplane: builtin\nbuiltin: {drainTime: 1s}\n"),
		"catalog-b.yaml": catalogYAML(bHTTPT.Port, bTCPT.Port),
		"config-b.yaml": configYAML("bench-b", "catalog-b.yaml", *ports["b-metrics"],
			"dataplane: builtin\nbuiltin: {drainTime: 1s}\n"),
		// The same origination as fwdproxy's clusters: client chain, Istio SNI and ALPN, server
		// chain verified against the mesh root and one name checked. HAProxy checks the server
		// name against the SNI and cannot match a URI SAN, so the benchmark's sidecars also
		// carry the SNI as a DNS SAN (fwdproxy still checks the SPIFFE ID).
		"haproxy.cfg": fmt.Sprintf(`global
  maxconn 4000
  nbthread %d
  ssl-server-verify required
defaults
  timeout connect 5s
  timeout client 1m
  timeout server 1m
frontend http
  mode http
  bind 127.0.0.1:%d
  default_backend productpage
backend productpage
  mode http
  http-reuse always
  server gw %s ssl crt %s ca-file %s sni str(%s) alpn istio-http/1.1 verify required
frontend tcp
  mode tcp
  bind 127.0.0.1:%d
  default_backend echo
backend echo
  mode tcp
  server gw %s ssl crt %s ca-file %s sni str(%s) alpn istio verify required
`, runtime.NumCPU(), *ports["haproxy-http"], gw.Addr(), fleetPEM, root, httpT.SNI(),
			*ports["haproxy-tcp"], gw.Addr(), fleetPEM, root, tcpT.SNI()),
		"env.sh": fmt.Sprintf(`HTTP_HOST=%s
FWDPROXY_HTTP=127.0.0.1:%d
FWDPROXY_TCP=127.0.0.1:%d
HAPROXY_HTTP=127.0.0.1:%d
HAPROXY_TCP=127.0.0.1:%d
DIRECT_HTTP=%s
DIRECT_TCP=%s
METRICS=127.0.0.1:%d
ENVOY_HTTP=127.0.0.1:%d
ENVOY_TCP=127.0.0.1:%d
ENVOY_METRICS=127.0.0.1:%d
ENVOY_ADMIN=127.0.0.1:%d
B_HTTP=127.0.0.1:%d
B_TCP=127.0.0.1:%d
`, httpHost, httpT.Port, tcpT.Port, *ports["haproxy-http"], *ports["haproxy-tcp"], directHTTP.Addr(), directTCP.Addr(), *ports["metrics"],
			envoyHTTPT.Port, envoyTCPT.Port, *ports["envoy-metrics"], *ports["envoy-proxy-admin"], bHTTPT.Port, bTCPT.Port),
	}
	if *envoyBin != "" {
		// The daemon writes Envoy's bootstrap itself and supervises it; Envoy runs with its
		// default concurrency (one worker per core), as in production.
		files["catalog-envoy.yaml"] = catalogYAML(envoyHTTPT.Port, envoyTCPT.Port)
		files["config-envoy.yaml"] = configYAML("bench-envoy", "catalog-envoy.yaml", *ports["envoy-metrics"],
			fmt.Sprintf("dataplane: envoy\nenvoy: {binary: %q, adminAddress: 127.0.0.1:%d, bootstrapPath: %q, drainTime: 1s, args: [--log-level, warning]}\n",
				*envoyBin, *ports["envoy-proxy-admin"], filepath.Join(*dir, "envoy-bootstrap.json")))
	}
	// env.sh last: the script starts reading the other files once it exists.
	names := slices.Sorted(maps.Keys(files))
	names = append(slices.DeleteFunc(names, func(n string) bool { return n == "env.sh" }), "env.sh")
	for _, name := range names {
		if err := os.WriteFile(filepath.Join(*dir, name), []byte(files[name]), 0o644); err != nil {
			return err
		}
	}
	fmt.Println("mesh ready; files in", *dir)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return nil
}

// tcpLoadCmd opens new connections as fast as -c workers can for -d: each writes a line,
// half-closes, and reads to EOF, expecting the line echoed at the end. It prints connections per
// second and latency percentiles of whole connections.
func tcpLoadCmd(args []string) error {
	fs := flag.NewFlagSet("tcpload", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to (required)")
	workers := fs.Int("c", 16, "concurrent connections")
	dur := fs.Duration("d", 10*time.Second, "duration")
	label := fs.String("label", "", "label printed with the result")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *addr == "" {
		return fmt.Errorf("-addr is required")
	}
	const msg = "ping\n"
	var mu sync.Mutex
	var lat []time.Duration
	errs := 0
	var firstErr error
	end := time.Now().Add(*dur)
	var wg sync.WaitGroup
	for range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			bad := 0
			var e1 error
			for time.Now().Before(end) {
				t0 := time.Now()
				err := oneConn(*addr, msg)
				if err != nil {
					bad++
					if e1 == nil {
						e1 = err
					}
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			errs += bad
			if firstErr == nil {
				firstErr = e1
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.Sort(lat)
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(float64(len(lat))*p))]
	}
	fmt.Printf("%s conns=%d conns/s=%.0f p50_ms=%.3f p99_ms=%.3f errors=%d\n", *label, len(lat), float64(len(lat))/dur.Seconds(),
		float64(pct(0.50).Microseconds())/1000, float64(pct(0.99).Microseconds())/1000, errs)
	if errs > 0 {
		fmt.Fprintln(os.Stderr, "first error:", firstErr)
	}
	return nil
}

func oneConn(addr, msg string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	_ = c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if !strings.HasSuffix(string(b), msg) {
		return fmt.Errorf("got %q, want it to end with %q", b, msg)
	}
	return nil
}

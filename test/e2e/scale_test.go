//go:build linux

package e2e_test

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// The README's benchmark catalog, served for real: 10,000 services, each with a port on one
// shared HTTP listener and a TCP port of its own (20,000 clusters, 10,001 listeners; about
// 10 MB of clusters in one xDS response, where gRPC's default limit is 4 MiB).
const (
	scaleServices = 10000
	// scaleListen is a loopback address of its own, so the 10,001 ports cannot collide with
	// other tests' listeners on 127.0.0.1.
	scaleListen = "127.0.0.77"
)

func scaleHost(i int) string { return fmt.Sprintf("svc-%05d.ns-%03d.svc.cluster.local", i, i%100) }
func scaleID(i int) string {
	return fmt.Sprintf("spiffe://cluster.local/ns/ns-%03d/sa/svc-%05d", i%100, i)
}

// TestLargeCatalogBuiltin and TestLargeCatalogEnvoy: each data plane acknowledges the whole
// 10,000-service configuration (/ready says "ready", not "ready on an earlier configuration")
// and serves a request to one of the services over HTTP and a connection to another over TCP.
func TestLargeCatalogBuiltin(t *testing.T) { runLargeCatalog(t, builtin) }

func TestLargeCatalogEnvoy(t *testing.T) {
	dp := envoyDataplane(t)
	configure := dp.configure
	// Envoy binds one socket per listener per worker: one worker keeps the 10,001 listeners
	// within the test machine's file limit (the machine image allows 1,048,576).
	dp.configure = func(t testing.TB, dir string) string {
		return strings.Replace(configure(t, dir), "drainTime:", `args: ["--concurrency", "1"], drainTime:`, 1)
	}
	runLargeCatalog(t, dp)
}

func runLargeCatalog(t *testing.T, dp dataplane) {
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeFleetCert(t, ca, filepath.Join(dir, "certs"), time.Hour)
	// The shared HTTP port, then one TCP port per service.
	picked := freePortsOn(t, scaleListen, 1+scaleServices)
	httpPort, tcpPorts := picked[0], picked[1:]
	const httpSvc, tcpSvc = 4242, 7777
	httpTarget := meshtest.Target{Host: scaleHost(httpSvc), Port: uint32(httpPort)}
	tcpTarget := meshtest.Target{Host: scaleHost(tcpSvc), Port: uint32(tcpPorts[tcpSvc])}

	// The mesh: one gateway, a sidecar for each of the two services the test calls.
	gwAddr, err := meshtest.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	gw, err := meshtest.StartGateway(gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Close() })
	for _, s := range []struct {
		i      int
		proto  string
		target meshtest.Target
	}{{httpSvc, meshtest.HTTP, httpTarget}, {tcpSvc, meshtest.TCP, tcpTarget}} {
		addr, err := meshtest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		sc, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: "svc-" + strconv.Itoa(s.i), SPIFFEID: scaleID(s.i), CA: ca, Protocol: s.proto, Addr: addr})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sc.Close() })
		gw.Route(s.target, sc.Addr())
	}

	var cat strings.Builder
	cat.WriteString("services:\n")
	for i := range scaleServices {
		fmt.Fprintf(&cat, "  - host: %s\n    ports: [{number: %d, protocol: http}, {number: %d, protocol: tcp}]\n    identities: [%s]\n",
			scaleHost(i), httpPort, tcpPorts[i], scaleID(i))
	}
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte(cat.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	gwHost, gwPort, err := net.SplitHostPort(gw.Addr())
	if err != nil {
		t.Fatal(err)
	}
	metrics := "127.0.0.1:" + strconv.Itoa(freePort(t))
	cfgYAML := fmt.Sprintf(`node: {id: e2e-scale}
gateways: [{name: eastwest, address: %s, port: %s}]
identity:
  spiffeID: %s
  files: {certChain: certs/cert-chain.pem, privateKey: certs/key.pem, roots: certs/root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: %s, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
%s`, gwHost, gwPort, fleetID, scaleListen, metrics, dp.configure(t, dir))
	logs := &meshtest.SyncBuffer{}
	started := time.Now()
	d := runDaemon(t, dir, cfgYAML, logs, slog.LevelInfo, 2*time.Minute, 8<<10)

	// Acknowledged: ready on the current configuration, not an earlier one. A cold start of this
	// size takes a while on a busy 2-core machine; the bound only stops a hung test.
	d.await(t, 5*time.Minute, 250*time.Millisecond, "the "+dp.name+" data plane acknowledges the 10,000-service configuration", func() error {
		resp, err := http.Get("http://" + metrics + "/ready")
		if err != nil {
			return err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if why := strings.TrimSpace(string(b)); err != nil || resp.StatusCode != 200 || why != "ready" {
			return fmt.Errorf("/ready: %d %q %v", resp.StatusCode, why, err)
		}
		return nil
	})
	ready := time.Since(started)
	if st := d.d.XDS.Status(); st.AckedCurrent < 1 {
		t.Fatalf("xDS status %+v: no data plane on the current configuration", st)
	}
	if strings.Contains(logs.String(), "rejected configuration") || strings.Contains(logs.String(), "larger than this data plane takes") {
		t.Errorf("a data plane rejected part of the configuration:\n%s", tail(logs.String(), 4<<10))
	}

	// One request by Host on the shared HTTP port, one connection on a service's TCP port. The
	// routes (one 3.6 MB route configuration) may still be on their way when listeners, clusters
	// and secrets are acknowledged, so the request is retried until it is routed.
	client := &http.Client{Timeout: 10 * time.Second}
	var code int
	var body []byte
	for deadline := time.Now().Add(time.Minute); ; {
		req, err := http.NewRequest(http.MethodGet, "http://"+net.JoinHostPort(scaleListen, strconv.Itoa(httpPort))+"/hello", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = httpTarget.Host
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if code = resp.StatusCode; code != http.StatusNotFound || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	r, perr := meshtest.ParseReport(string(body))
	if code != 200 || perr != nil || r.Service != "svc-"+strconv.Itoa(httpSvc) || r.SNI != httpTarget.SNI() || r.Caller != fleetID {
		t.Errorf("HTTP to %s: %d %q (%v)", httpTarget.Host, code, body, perr)
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort(scaleListen, strconv.Itoa(int(tcpTarget.Port))), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	tr, err := meshtest.ReadReportLine(br)
	if err != nil || tr.Service != "svc-"+strconv.Itoa(tcpSvc) || tr.SNI != tcpTarget.SNI() || tr.Caller != fleetID {
		t.Errorf("TCP to %s: %+v %v", tcpTarget.Host, tr, err)
	}
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		t.Fatal(err)
	}
	if echo, err := br.ReadString('\n'); err != nil || echo != "ping\n" {
		t.Errorf("TCP echo %q %v", echo, err)
	}
	t.Logf("%s data plane: 10,000 services x 2 ports (20,000 clusters, 10,001 listeners) acknowledged and serving %.1fs after the daemon started",
		dp.name, ready.Seconds())
}

// freePortsOn returns n distinct ports that were free on host a moment ago: each from a port-0
// listener, all held open until the last is picked.
func freePortsOn(t testing.TB, host string, n int) []int {
	t.Helper()
	ports := make([]int, 0, n)
	held := make([]net.Listener, 0, n)
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatalf("port %d of %d on %s: %v", len(ports)+1, n, host, err)
		}
		held = append(held, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

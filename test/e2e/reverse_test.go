//go:build linux

package e2e_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// The reverse direction end to end: mesh workloads, originating mTLS as an Istio sidecar does
// for a DestinationRule tls.mode ISTIO_MUTUAL (SNI outbound_.PORT_._.HOST, Istio's ALPN, the
// fleet's SPIFFE ID checked as the ServiceEntry's subjectAltNames), call services on legacy VMs
// through the fleet's inbound listener.

const (
	vmHTTPHost  = "billing.vm.example.internal"
	vmTCPHost   = "ledger.vm.example.internal"
	vmHTTPPort  = 8080
	vmTCPPort   = 5432
	frontendID  = "spiffe://cluster.local/ns/shop/sa/frontend"
	strangerID  = "spiffe://cluster.local/ns/shop/sa/stranger"
	rotateAfter = time.Hour
)

type reverseEnv struct {
	t        testing.TB
	dir      string
	ca       *meshtest.CA
	inbound  string // the fleet's inbound mTLS address
	metrics  string
	catalog  string
	certs    string
	logs     *meshtest.SyncBuffer
	httpVMs  []*meshtest.VMBackend
	tcpVMs   []*meshtest.VMBackend
	builtin  bool
	frontend *meshtest.Leaf
	clients  sync.Map // key -> *http.Client
	// killed is when BackendKilledUnderLoad stopped tcp-0 (unix ns); cut counts the sessions
	// that were open on it then.
	killed, cut atomic.Int64
}

func startReverse(t testing.TB, dp dataplane) *reverseEnv {
	t.Helper()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	e := &reverseEnv{t: t, dir: t.TempDir(), ca: ca, logs: &meshtest.SyncBuffer{}, builtin: dp.name == "builtin"}
	for i := range 2 {
		h, err := meshtest.StartVMHTTP(fmt.Sprintf("http-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Stop)
		e.httpVMs = append(e.httpVMs, h)
		c, err := meshtest.StartVMTCP(fmt.Sprintf("tcp-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Stop)
		e.tcpVMs = append(e.tcpVMs, c)
	}
	if e.frontend, err = ca.IssueFor(frontendID, time.Hour); err != nil {
		t.Fatal(err)
	}
	e.certs = filepath.Join(e.dir, "certs")
	if err := os.MkdirAll(e.certs, 0o700); err != nil {
		t.Fatal(err)
	}
	e.writeFleetIdentity()
	e.catalog = filepath.Join(e.dir, "catalog.yaml")
	e.writeCatalog(false)
	e.metrics = "127.0.0.1:" + strconv.Itoa(freePort(t))
	inPort := freePort(t)
	e.inbound = "127.0.0.1:" + strconv.Itoa(inPort)
	cfgYAML := fmt.Sprintf(`node: {id: e2e-reverse}
gateways: [{name: eastwest, address: 127.0.0.1, port: %d}]
identity:
  spiffeID: %s
  files: {certChain: certs/cert-chain.pem, privateKey: certs/key.pem, roots: certs/root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: true}
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
reverse:
  address: 127.0.0.1
  port: %d
  loadBalancer: fwdproxy.nlb.example.internal
  connectTimeout: 1s
  healthCheck: {interval: 300ms, timeout: 200ms, unhealthyThreshold: 1, healthyThreshold: 1}
  outlierDetection: {consecutiveErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  services:
    - host: %s
      ports: [{number: %d, protocol: http, healthCheckPath: /healthz}]
      backends: [%s, %s]
      allowedPrincipals: [cluster.local/ns/shop/sa/frontend]
    - host: %s
      ports: [{number: %d, protocol: tcp}]
      backends: [%s, %s]
      allowedPrincipals: [%s]
%s`, freePort(t), fleetID, e.metrics, inPort,
		vmHTTPHost, vmHTTPPort, e.httpVMs[0].Addr, e.httpVMs[1].Addr,
		vmTCPHost, vmTCPPort, e.tcpVMs[0].Addr, e.tcpVMs[1].Addr, frontendID,
		dp.configure(t, e.dir))
	d := runDaemon(t, e.dir, cfgYAML, e.logs, slog.LevelDebug, 45*time.Second, 0)
	t.Cleanup(func() { // before the daemon stops
		e.clients.Range(func(_, c any) bool { c.(*http.Client).CloseIdleConnections(); return true })
	})
	// Ready once both VM services answer an allowed caller.
	d.await(t, 30*time.Second, 100*time.Millisecond, "reverse direction serving", func() error {
		if _, _, err := e.getHTTP(e.frontend, "/ready"); err != nil {
			return err
		}
		_, err := e.tcpCall(e.frontend, "ping")
		return err
	})
	return e
}

// writeFleetIdentity issues a new fleet certificate and swaps it in, as a rotation does.
func (e *reverseEnv) writeFleetIdentity() *meshtest.Leaf {
	e.t.Helper()
	leaf, err := e.ca.IssueFor(fleetID, rotateAfter)
	if err != nil {
		e.t.Fatal(err)
	}
	tmp := filepath.Join(e.dir, "certs-new")
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		e.t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(tmp, e.ca.RootPEM); err != nil {
		e.t.Fatal(err)
	}
	// Key first, then the chain: the daemon reloads a pair that matches.
	for _, f := range []string{"key.pem", "root-cert.pem", "cert-chain.pem"} {
		if err := os.Rename(filepath.Join(tmp, f), filepath.Join(e.certs, f)); err != nil {
			e.t.Fatal(err)
		}
	}
	return leaf
}

func (e *reverseEnv) writeCatalog(added bool) {
	e.t.Helper()
	doc := "services:\n  - host: productpage.bookinfo.svc.cluster.local\n    ports: [{number: " + strconv.Itoa(freePort(e.t)) + ", protocol: http}]\n    identities: [" + productpageID + "]\n"
	if added {
		doc += "  - host: added.bookinfo.svc.cluster.local\n    ports: [{number: " + strconv.Itoa(freePort(e.t)) + ", protocol: tcp}]\n    identities: [" + addedID + "]\n"
	}
	tmp := e.catalog + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.catalog); err != nil {
		e.t.Fatal(err)
	}
}

// meshTLS is the TLS a sidecar originates for target with leaf as the workload's identity.
func (e *reverseEnv) meshTLS(leaf *meshtest.Leaf, ca *meshtest.CA, target meshtest.Target, proto string) *tls.Config {
	e.t.Helper()
	conf, err := meshtest.ClientTLS(leaf, ca, target, meshtest.SidecarClientALPN(proto), fleetID)
	if err != nil {
		e.t.Fatal(err)
	}
	return conf
}

// getHTTP calls the VM HTTP service as the workload holding leaf (nil: no certificate).
func (e *reverseEnv) getHTTP(leaf *meshtest.Leaf, path string) (int, meshtest.VMReport, error) {
	return e.getHTTPFrom(leaf, e.ca, path, nil)
}

func (e *reverseEnv) getHTTPFrom(leaf *meshtest.Leaf, ca *meshtest.CA, path string, hdr http.Header) (int, meshtest.VMReport, error) {
	key := fmt.Sprintf("%p/%p", leaf, ca)
	c, ok := e.clients.Load(key)
	if !ok {
		conf := e.meshTLS(leaf, e.ca, meshtest.Target{Host: vmHTTPHost, Port: vmHTTPPort}, meshtest.HTTP)
		if ca != e.ca { // the workload's own certificate is from another root
			other := e.meshTLS(leaf, ca, meshtest.Target{Host: vmHTTPHost, Port: vmHTTPPort}, meshtest.HTTP)
			conf.GetClientCertificate = other.GetClientCertificate
		}
		c, _ = e.clients.LoadOrStore(key, meshtest.MeshHTTPClient(e.inbound, conf, false))
	}
	req, err := http.NewRequest("GET", "http://"+vmHTTPHost+":"+strconv.Itoa(vmHTTPPort)+path, nil)
	if err != nil {
		return 0, meshtest.VMReport{}, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := c.(*http.Client).Do(req)
	if err != nil {
		return 0, meshtest.VMReport{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, meshtest.VMReport{}, err
	}
	var r meshtest.VMReport
	if resp.StatusCode == 200 {
		if err := json.Unmarshal(body, &r); err != nil {
			return resp.StatusCode, r, fmt.Errorf("VM answer %q: %v", body, err)
		}
	}
	return resp.StatusCode, r, nil
}

// errNoGreeting: the session through the fleet was set up, but the VM's greeting never came.
var errNoGreeting = errors.New("greeting")

// tcpCall opens a connection to the VM TCP service as leaf's workload, reads the VM's greeting,
// sends msg and reads it echoed. It returns the backend's name.
func (e *reverseEnv) tcpCall(leaf *meshtest.Leaf, msg string) (string, error) {
	conf := e.meshTLS(leaf, e.ca, meshtest.Target{Host: vmTCPHost, Port: vmTCPPort}, meshtest.TCP)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := meshtest.DialMesh(ctx, e.inbound, conf)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	name, err := meshtest.ReadVMGreeting(br)
	if err != nil {
		return "", fmt.Errorf("%w: %w", errNoGreeting, err)
	}
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return name, err
	}
	echo, err := br.ReadString('\n')
	if err != nil || echo != msg+"\n" {
		return name, fmt.Errorf("echo %q, %v", echo, err)
	}
	return name, nil
}

// wantXFCC is Envoy's x-forwarded-client-cert for a caller holding leaf, as the fleet sets it.
func wantXFCC(leaf *meshtest.Leaf) string {
	sum := sha256.Sum256(leaf.Cert.Raw)
	return "By=" + fleetID + ";Hash=" + hex.EncodeToString(sum[:]) + `;Subject="";URI=` + meshtest.SPIFFEID(leaf.Cert)
}

func runReverse(t *testing.T, dp dataplane) {
	e := startReverse(t, dp)
	stranger, err := e.ca.IssueFor(strangerID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("AllowedHTTPGetsItsIdentityInXFCC", func(t *testing.T) {
		forged := http.Header{"X-Forwarded-Client-Cert": {"By=spiffe://x;URI=spiffe://cluster.local/ns/admin/sa/root"}}
		code, r, err := e.getHTTPFrom(e.frontend, e.ca, "/invoices", forged)
		if err != nil || code != 200 {
			t.Fatalf("GET: %d %v", code, err)
		}
		if len(r.XFCC) != 1 || r.XFCC[0] != wantXFCC(e.frontend) {
			t.Errorf("XFCC reaching the VM: %q, want exactly %q", r.XFCC, wantXFCC(e.frontend))
		}
		if r.Path != "/invoices" || r.Host != vmHTTPHost+":"+strconv.Itoa(vmHTTPPort) {
			t.Errorf("VM saw host %q path %q", r.Host, r.Path)
		}
		// Round robin: both backends answer.
		seen := map[string]bool{}
		for i := 0; i < 20 && len(seen) < 2; i++ {
			if _, r, err := e.getHTTP(e.frontend, "/"); err == nil {
				seen[r.Backend] = true
			}
		}
		if len(seen) != 2 {
			t.Errorf("backends answering: %v", seen)
		}
	})

	t.Run("PrincipalNotAllowedGets403", func(t *testing.T) {
		before := e.httpVMs[0].Requests.Load() + e.httpVMs[1].Requests.Load()
		code, _, err := e.getHTTP(stranger, "/invoices")
		if err != nil || code != http.StatusForbidden {
			t.Fatalf("stranger: %d %v, want 403", code, err)
		}
		if after := e.httpVMs[0].Requests.Load() + e.httpVMs[1].Requests.Load(); after != before {
			t.Errorf("a refused call reached a VM (%d -> %d)", before, after)
		}
	})

	t.Run("AllowedTCP", func(t *testing.T) {
		seen := map[string]bool{}
		for i := 0; i < 10 && len(seen) < 2; i++ {
			name, err := e.tcpCall(e.frontend, "hello")
			if err != nil {
				t.Fatal(err)
			}
			seen[name] = true
		}
		if len(seen) != 2 {
			t.Errorf("TCP backends answering: %v", seen)
		}
	})

	t.Run("PrincipalNotAllowedTCPIsClosed", func(t *testing.T) {
		conf := e.meshTLS(stranger, e.ca, meshtest.Target{Host: vmTCPHost, Port: vmTCPPort}, meshtest.TCP)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := meshtest.DialMesh(ctx, e.inbound, conf)
		if err != nil {
			t.Fatalf("handshake: %v (the refusal comes after it, on the principal)", err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		// A client-first caller: its first bytes are where Envoy's RBAC decides.
		_, _ = io.WriteString(c, "secret\n")
		got, err := io.ReadAll(c)
		// Envoy's network RBAC decides on the caller's first bytes, after tcp_proxy has connected:
		// a server-first VM's greeting can reach a refused caller (as on an Istio sidecar).
		t.Logf("a refused TCP caller read %q (%v)", got, err)
		if strings.Contains(string(got), "secret") {
			t.Errorf("a refused caller's bytes reached the VM and came back: %q", got)
		}
		if err != nil && !errors.Is(err, io.EOF) && !isReset(err) {
			t.Errorf("read: %v, want the connection closed", err)
		}
		if e.builtin && len(got) > 0 {
			// The built-in data plane decides right after the handshake, before dialing a VM.
			t.Errorf("a refused caller read %q", got)
		}
	})

	t.Run("OtherRootRefusedAtHandshake", func(t *testing.T) {
		other, err := meshtest.NewCA("cluster.local")
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := other.IssueFor(frontendID, time.Hour) // the right name, the wrong root
		if err != nil {
			t.Fatal(err)
		}
		before := e.httpVMs[0].Requests.Load() + e.httpVMs[1].Requests.Load()
		if code, _, err := e.getHTTPFrom(leaf, other, "/", nil); err == nil {
			t.Errorf("a client certificate from another root got %d", code)
		}
		if code, _, err := e.getHTTP(nil, "/"); err == nil {
			t.Errorf("a client without a certificate got %d", code)
		}
		if after := e.httpVMs[0].Requests.Load() + e.httpVMs[1].Requests.Load(); after != before {
			t.Errorf("a refused handshake reached a VM")
		}
	})

	t.Run("UnknownSNIRefused", func(t *testing.T) {
		conf := e.meshTLS(e.frontend, e.ca, meshtest.Target{Host: "unknown.vm.example.internal", Port: vmHTTPPort}, meshtest.HTTP)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if c, err := meshtest.DialMesh(ctx, e.inbound, conf); err == nil {
			c.Close()
			t.Error("a handshake for an unknown SNI succeeded")
		}
	})

	t.Run("EnvoySidecarClient", func(t *testing.T) {
		for _, tc := range []struct {
			proto  string
			target meshtest.Target
		}{
			{meshtest.HTTP, meshtest.Target{Host: vmHTTPHost, Port: vmHTTPPort}},
			{meshtest.TCP, meshtest.Target{Host: vmTCPHost, Port: vmTCPPort}},
		} {
			listen, err := meshtest.FreeAddr()
			if err != nil {
				t.Fatal(err)
			}
			p, err := meshtest.StartEnvoyMeshClient(t.TempDir(), meshtest.EnvoyMeshClientOptions{
				Name: "frontend-" + tc.proto, SPIFFEID: frontendID, CA: e.ca, Listen: listen, Upstream: e.inbound,
				Target: tc.target, Protocol: tc.proto, ServerID: fleetID,
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = p.Stop() })
			if tc.proto == meshtest.HTTP {
				resp, err := http.Get("http://" + listen + "/from-envoy")
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var r meshtest.VMReport
				if resp.StatusCode != 200 || json.Unmarshal(body, &r) != nil {
					t.Fatalf("through an Envoy sidecar: %d %s\n%s", resp.StatusCode, body, p.Output())
				}
				if len(r.XFCC) != 1 || !strings.HasSuffix(r.XFCC[0], ";Subject=\"\";URI="+frontendID) || !strings.HasPrefix(r.XFCC[0], "By="+fleetID+";Hash=") {
					t.Errorf("XFCC through an Envoy sidecar: %q", r.XFCC)
				}
				continue
			}
			c, err := net.DialTimeout("tcp", listen, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			br := bufio.NewReader(c)
			if _, err := meshtest.ReadVMGreeting(br); err != nil {
				t.Fatalf("TCP through an Envoy sidecar: %v\n%s", err, p.Output())
			}
			_, _ = io.WriteString(c, "via envoy\n")
			if echo, err := br.ReadString('\n'); err != nil || echo != "via envoy\n" {
				t.Errorf("echo %q %v", echo, err)
			}
			c.Close()
		}
	})

	if e.builtin {
		t.Run("MetricsPerServiceAndPrincipal", func(t *testing.T) {
			m := metricsText(t, e.metrics)
			for _, want := range []string{
				`fwdproxy_dataplane_reverse_requests_total{code="200",principal="` + frontendID + `",service="` + vmHTTPHost + `:8080"}`,
				`fwdproxy_dataplane_reverse_requests_total{code="403",principal="other",service="` + vmHTTPHost + `:8080"}`,
				`fwdproxy_dataplane_reverse_connections_total{principal="` + frontendID + `",result="allowed",service="` + vmTCPHost + `:5432"}`,
				`fwdproxy_dataplane_reverse_connections_total{principal="other",result="denied",service="` + vmTCPHost + `:5432"}`,
			} {
				if !strings.Contains(m, want) {
					t.Errorf("metrics lack %s", want)
				}
			}
		})
	}

	t.Run("FailingHealthCheckTakesNoTraffic", func(t *testing.T) {
		// Both backends answer requests; http-0's /healthz says 503: only the health check
		// can take it out.
		e.httpVMs[0].SetHealthy(false)
		defer func() {
			if t.Failed() {
				t.Logf("data plane's view of the clusters:\n%s", e.clusterDump())
			}
		}()
		eventually(t, "http-0 out of rotation", func() error {
			for range 10 {
				if _, r, err := e.getHTTP(e.frontend, "/hc"); err != nil || r.Backend != "http-1" {
					return fmt.Errorf("answered by %q (%v)", r.Backend, err)
				}
			}
			return nil
		})
		e.httpVMs[0].SetHealthy(true)
		eventually(t, "http-0 back in rotation", func() error {
			for range 10 {
				if _, r, err := e.getHTTP(e.frontend, "/hc"); err == nil && r.Backend == "http-0" {
					return nil
				}
			}
			return errors.New("http-0 answers nothing")
		})
	})

	t.Run("RotationUnderLoad", func(t *testing.T) {
		l := e.startLoad()
		l.progress(t, 30)
		e.writeCatalog(true) // a catalog change: a new snapshot, the inbound listener unchanged
		eventually(t, "the changed catalog served", func() error {
			if !strings.Contains(e.logs.String(), "services=2") {
				return errors.New("no configuration with both catalog services yet")
			}
			return nil
		})
		l.progress(t, 30)
		leaf := e.writeFleetIdentity() // the fleet's certificate rotates under the inbound listener
		eventually(t, "the new fleet certificate served", func() error {
			conf := e.meshTLS(e.frontend, e.ca, meshtest.Target{Host: vmTCPHost, Port: vmTCPPort}, meshtest.TCP)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := meshtest.DialMesh(ctx, e.inbound, conf)
			if err != nil {
				return err
			}
			defer c.Close()
			if got := c.ConnectionState().PeerCertificates[0]; !got.Equal(leaf.Cert) {
				return fmt.Errorf("still serving serial %v", got.SerialNumber)
			}
			return nil
		})
		l.progress(t, 60)
		l.finish(t)
	})

	t.Run("BackendKilledUnderLoad", func(t *testing.T) {
		l := e.startLoad()
		l.progress(t, 30)
		e.httpVMs[0].Stop()
		e.tcpVMs[0].Stop()
		e.killed.Store(time.Now().UnixNano())
		l.progress(t, 300)
		l.finish(t)
		t.Logf("TCP sessions open on the killed VM and cut with it: %d", e.cut.Load())
		for i := 0; i < 5; i++ {
			if _, r, err := e.getHTTP(e.frontend, "/"); err != nil || r.Backend != "http-1" {
				t.Errorf("after the kill: %q %v", r.Backend, err)
			}
			if name, err := e.tcpCall(e.frontend, "after"); err != nil || name != "tcp-1" {
				t.Errorf("TCP after the kill: %q %v", name, err)
			}
		}
	})
}

// clusterDump is Envoy's /clusters (the Envoy data plane), for failure messages.
func (e *reverseEnv) clusterDump() string {
	cfg, err := os.ReadFile(filepath.Join(e.dir, "config.yaml"))
	if err != nil {
		return err.Error()
	}
	_, rest, ok := strings.Cut(string(cfg), "adminAddress: ")
	if !ok {
		return "(built-in data plane)"
	}
	admin, _, _ := strings.Cut(rest, ",")
	resp, err := http.Get("http://" + admin + "/clusters")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "inbound|") && (strings.Contains(line, "health_flags") || strings.Contains(line, "rq_total")) {
			out = append(out, line)
		}
	}
	if resp, err := http.Get("http://" + admin + "/stats?filter=health_check"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		out = append(out, string(b))
	}
	return strings.Join(out, "\n")
}

// startLoad runs HTTP and TCP callers of the VM services as the allowed workload.
func (e *reverseEnv) startLoad() *load {
	var n atomic.Int64
	frontend := func() error {
		code, r, err := e.getHTTP(e.frontend, "/load")
		if err == nil && (code != 200 || !strings.HasPrefix(r.Backend, "http-")) {
			err = fmt.Errorf("status %d backend %q", code, r.Backend)
		}
		return err
	}
	return runLoad(frontend, frontend, frontend, func() error {
		start := time.Now().UnixNano()
		name, err := e.tcpCall(e.frontend, "load-"+strconv.FormatInt(n.Add(1), 10))
		if k := e.killed.Load(); err != nil && (name == "tcp-0" || errors.Is(err, errNoGreeting)) && k != 0 && start < k {
			// A session already open on the VM that was killed dies with it; nothing can save
			// it. Every session opened after the kill must reach the remaining VM. (One cut
			// before the VM's greeting arrived has no name: through the fleet to a VM, and
			// started before the kill, only the killed VM explains it.)
			e.cut.Add(1)
			return nil
		}
		return err
	})
}

func metricsText(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestReverseEnvoy(t *testing.T)   { runReverse(t, envoyDataplane(t)) }
func TestReverseBuiltin(t *testing.T) { runReverse(t, builtin) }

// BenchmarkReverseHTTP: one mesh caller's keep-alive GETs through the inbound listener to two
// VM backends, per data plane (b.N requests; ns/op is the mean latency of one).
func BenchmarkReverseHTTP(b *testing.B) {
	bin, err := meshtest.EnvoyPath()
	if err != nil {
		b.Fatal(err)
	}
	envoy := dataplane{name: "envoy", configure: func(t testing.TB, dir string) string {
		return fmt.Sprintf("dataplane: envoy\nenvoy: {binary: %s, adminAddress: 127.0.0.1:%d, bootstrapPath: %s, drainTime: 1s}\n",
			bin, freePort(t), filepath.Join(dir, "envoy-bootstrap.json"))
	}}
	for _, dp := range []dataplane{builtin, envoy} {
		b.Run(dp.name, func(b *testing.B) {
			e := startReverse(b, dp)
			b.ResetTimer()
			for range b.N {
				if code, _, err := e.getHTTP(e.frontend, "/bench"); err != nil || code != 200 {
					b.Fatalf("%d %v", code, err)
				}
			}
		})
	}
}

//go:build linux

// Package e2e_test drives the real pieces end to end: the daemon (control plane) with its data
// plane, in front of a stand-in mesh (east-west gateway in AUTO_PASSTHROUGH mode and mTLS
// sidecars), with plain HTTP and TCP clients. The same scenario runs against the Go stand-ins,
// against HAProxy/nginx and against Envoys configured as Istio's, with the built-in data plane
// and with Envoy.
package e2e_test

import (
	"bufio"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// consecutiveErrors is the outlier detection threshold the scenario configures.
const consecutiveErrors = 3

// env is one running scenario: a mesh, the fleet's identity, config and catalog, and the daemon.
type env struct {
	t       testing.TB
	dir     string
	ca      *meshtest.CA
	ports   ports
	mesh    *mesh
	catalog string
	certs   string
	metrics string
	// failover: a connect failure is retried on another gateway, so losing one fails no request.
	failover bool
	// builtin: the built-in data plane, whose fwdproxy_dataplane_* metrics the daemon serves.
	builtin bool
	logs    *meshtest.SyncBuffer
	clients sync.Map // source IP -> *http.Client
	// stop ends the daemon (once) and returns what Run returned.
	stop func() error
	// fleetLeaf is the fleet certificate the daemon serves.
	fleetLeaf *x509.Certificate
}

// dataplane is how the scenario's bytes are moved.
type dataplane struct {
	name string
	// configure adds the data plane's settings to the daemon config.
	configure func(t testing.TB, dir string) string
	failover  bool
	// listen adds settings to the config's listen section, e.g. ", maxConnections: 2".
	listen string
	// priorities are the gateways' failover priorities (gateways[i].priority); nil: all 0.
	priorities []uint32
}

var builtin = dataplane{name: "builtin", configure: func(testing.TB, string) string { return "dataplane: builtin\n" }, failover: true}

func freePort(t testing.TB) int {
	t.Helper()
	p, err := meshtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// start builds the mesh with newMesh and runs the daemon in front of it.
func start(t testing.TB, newMesh func(testing.TB, *meshtest.CA, ports) *mesh, dp dataplane) *env {
	t.Helper()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, dir: t.TempDir(), ca: ca, logs: &meshtest.SyncBuffer{}, failover: dp.failover, builtin: dp.name == "builtin"}
	e.ports = ports{http: freePort(t), h2: freePort(t), tcp: freePort(t), grpc: freePort(t)}
	e.mesh = newMesh(t, ca, e.ports)
	e.certs = filepath.Join(e.dir, "certs")
	e.fleetLeaf = writeFleetCert(t, ca, e.certs, time.Hour).Cert
	e.catalog = filepath.Join(e.dir, "catalog.yaml")
	e.writeCatalog(false)
	e.metrics = "127.0.0.1:" + strconv.Itoa(freePort(t))
	var gws strings.Builder
	for i, g := range e.mesh.gateways {
		host, port, err := net.SplitHostPort(g)
		if err != nil {
			t.Fatal(err)
		}
		prio := uint32(0)
		if i < len(dp.priorities) {
			prio = dp.priorities[i]
		}
		fmt.Fprintf(&gws, "  - {name: eastwest-%d, address: %s, port: %s, priority: %d}\n", i, host, port, prio)
	}
	// mesh.peerMetadata is on: harmless to every other step, and ForgedHeaders checks what the
	// sidecars decode of it.
	cfgYAML := fmt.Sprintf(`node: {id: e2e}
mesh: {peerMetadata: {enabled: true, labels: {app: legacy-vms, version: v1}}}
gateways:
%sidentity:
  spiffeID: %s
  files: {certChain: certs/cert-chain.pem, privateKey: certs/key.pem, roots: certs/root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false%s}
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
upstream:
  connectTimeout: 2s
  outlierDetection: {consecutiveErrors: %d, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
%s`, gws.String(), fleetID, dp.listen, e.metrics, consecutiveErrors, dp.configure(t, e.dir))
	d := runDaemon(t, e.dir, cfgYAML, e.logs, slog.LevelDebug, 45*time.Second, 0)
	e.stop = d.stop
	t.Cleanup(func() { // before the daemon stops
		e.clients.Range(func(_, c any) bool { c.(*http.Client).CloseIdleConnections(); return true })
	})
	// Ready, and a first answer from productpage.
	d.await(t, 30*time.Second, 100*time.Millisecond, "ready", func() error {
		resp, err := http.Get("http://" + e.metrics + "/ready")
		if err != nil {
			return err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			return fmt.Errorf("/ready: %d %q %v", resp.StatusCode, b, err)
		}
		if code, _, err := e.get("", "productpage.bookinfo.svc.cluster.local", e.ports.http, "/"); err != nil || code != 200 {
			return fmt.Errorf("productpage: %d %v", code, err)
		}
		return nil
	})
	return e
}

func (e *env) writeCatalog(withAdded bool) {
	e.t.Helper()
	svc := func(host, id string, port int, proto string, extra string) string {
		return fmt.Sprintf("  - host: %s.bookinfo.svc.cluster.local\n    ports: [{number: %d, protocol: %s}]\n    identities: [%s]\n%s", host, port, proto, id, extra)
	}
	var b strings.Builder
	b.WriteString("services:\n")
	b.WriteString(svc("productpage", productpageID, e.ports.http, "http", "    aliases: [productpage.example.internal]\n"))
	b.WriteString(svc("reviews", reviewsID, e.ports.http, "http", "    subsets: [{name: v2, hosts: [reviews-v2.example.internal]}]\n"))
	b.WriteString(svc("details", detailsID, e.ports.http, "http", "    allowedClients: [127.0.0.1/32]\n"))
	b.WriteString(svc("impostor", impostorExpected, e.ports.http, "http", ""))
	b.WriteString(svc("ratings", ratingsID, e.ports.h2, "http2", ""))
	b.WriteString(svc("mysql", mysqlID, e.ports.tcp, "tcp", "    allowedClients: [127.0.0.1/32]\n"))
	b.WriteString(svc("echo", echoID, e.ports.grpc, "grpc", e.echoTranscoding()))
	if withAdded {
		b.WriteString(svc("added", addedID, e.ports.http, "http", ""))
	}
	e.replaceCatalog(b.String())
}

// replaceCatalog swaps the catalog file's content at once, as a deploy tool would.
func (e *env) replaceCatalog(content string) {
	e.t.Helper()
	tmp := e.catalog + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.catalog); err != nil {
		e.t.Fatal(err)
	}
}

// client is a keep-alive HTTP client whose connections come from source IP from ("" for any).
func (e *env) client(from string) *http.Client {
	if c, ok := e.clients.Load(from); ok {
		return c.(*http.Client)
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: d.DialContext, MaxIdleConnsPerHost: 64}}
	e.clients.Store(from, c)
	return c
}

// get sends GET path with Host host to the data plane's port, from source IP from.
func (e *env) get(from, host string, port int, path string) (int, meshtest.Report, error) {
	return e.getWith(from, host, port, path, nil)
}

// getWith is get with the request headers hdr.
func (e *env) getWith(from, host string, port int, path string, hdr http.Header) (int, meshtest.Report, error) {
	code, _, r, err := e.exchange(from, host, port, path, hdr)
	return code, r, err
}

// exchange is getWith that also returns the response headers the client received.
func (e *env) exchange(from, host string, port int, path string, hdr http.Header) (int, http.Header, meshtest.Report, error) {
	req, err := http.NewRequest("GET", "http://127.0.0.1:"+strconv.Itoa(port)+path, nil)
	if err != nil {
		return 0, nil, meshtest.Report{}, err
	}
	req.Host = host
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := e.client(from).Do(req)
	if err != nil {
		return 0, nil, meshtest.Report{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, resp.Header, meshtest.Report{}, err
	}
	if resp.StatusCode != 200 {
		return resp.StatusCode, resp.Header, meshtest.Report{Fields: map[string]string{"body": string(body)}}, nil
	}
	r, err := meshtest.ParseReport(string(body))
	return resp.StatusCode, resp.Header, r, err
}

// tcp opens a connection to the TCP service port from source IP from, reads the sidecar's
// report line and, when the sidecar echoes, checks a round trip.
func (e *env) tcp(from string) (meshtest.Report, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", "127.0.0.1:"+strconv.Itoa(e.ports.tcp))
	if err != nil {
		return meshtest.Report{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	r, err := meshtest.ReadReportLine(br)
	if err != nil {
		return r, err
	}
	if e.mesh.echo {
		msg := "ping " + strconv.Itoa(int(time.Now().UnixNano())) + "\n"
		if _, err := io.WriteString(c, msg); err != nil {
			return r, err
		}
		got, err := br.ReadString('\n')
		if err != nil || got != msg {
			return r, fmt.Errorf("echo: got %q, %v; want %q", got, err, msg)
		}
	}
	return r, nil
}

// checkReport asserts what the sidecar saw: the fleet's identity, verified, the Istio SNI and ALPN.
func (e *env) checkReport(what string, r meshtest.Report, service string, target meshtest.Target, alpn []string) {
	e.t.Helper()
	if r.Service != service || r.Caller != fleetID || !r.Verified || r.SNI != target.SNI() {
		e.t.Errorf("%s: sidecar saw service=%q caller=%q verified=%v sni=%q; want %s, %s, true, %s",
			what, r.Service, r.Caller, r.Verified, r.SNI, service, fleetID, target.SNI())
	}
	if len(r.ALPN) == 0 || slices.ContainsFunc(r.ALPN, func(p string) bool { return !slices.Contains(alpn, p) }) {
		e.t.Errorf("%s: ALPN %q, want within %q", what, r.ALPN, alpn)
	}
	// The Go stand-in reports the whole offered list; HAProxy and nginx the negotiated protocol;
	// Envoy the first offered protocol its listener has a chain for (no formatter names the
	// ClientHello's ALPN, and istio-http/1.1 negotiates none with a real sidecar's h2, http/1.1).
	if e.mesh.kind == "go" && !slices.Equal(r.ALPN, alpn) {
		e.t.Errorf("%s: offered ALPN %q, want exactly %q", what, r.ALPN, alpn)
	}
}

func target(name string, port int, subset string) meshtest.Target {
	return meshtest.Target{Host: name + ".bookinfo.svc.cluster.local", Port: uint32(port), Subset: subset}
}

var (
	alpnHTTP = []string{"istio-http/1.1"}
	alpnH2   = []string{"istio-h2"}
	alpnTCP  = []string{"istio"}
)

// runSuite is the scenario, in order; the last step takes a gateway away.
func runSuite(t *testing.T, newMesh func(testing.TB, *meshtest.CA, ports) *mesh, dp dataplane) {
	e := start(t, newMesh, dp)
	p := e.ports

	t.Run("HTTPByHost", func(t *testing.T) {
		e.t = t
		for _, host := range []string{"productpage.bookinfo.svc.cluster.local", "productpage.bookinfo.svc.cluster.local:" + strconv.Itoa(p.http)} {
			code, r, err := e.get("", host, p.http, "/productpage")
			if err != nil || code != 200 {
				t.Fatalf("Host %s: %d %v %v", host, code, err, r.Fields)
			}
			e.checkReport("Host "+host, r, "productpage", target("productpage", p.http, ""), alpnHTTP)
			if r.Fields["path"] != "/productpage" || r.Proto != "HTTP/1.1" {
				t.Errorf("Host %s: path %q proto %q", host, r.Fields["path"], r.Proto)
			}
		}
		code, r, err := e.get("", "reviews.bookinfo.svc.cluster.local", p.http, "/reviews/1")
		if err != nil || code != 200 {
			t.Fatalf("reviews: %d %v", code, err)
		}
		e.checkReport("reviews", r, "reviews-v1", target("reviews", p.http, ""), alpnHTTP)
		if code, _, err := e.get("", "nowhere.example.internal", p.http, "/"); err != nil || code != 404 {
			t.Errorf("unknown Host: %d %v, want 404", code, err)
		}
	})

	t.Run("HTTPByAlias", func(t *testing.T) {
		e.t = t
		code, r, err := e.get("", "productpage.example.internal", p.http, "/")
		if err != nil || code != 200 {
			t.Fatalf("alias: %d %v", code, err)
		}
		e.checkReport("alias", r, "productpage", target("productpage", p.http, ""), alpnHTTP)
		if r.Host != "productpage.example.internal" {
			t.Errorf("sidecar saw Host %q", r.Host)
		}
		code, r, err = e.get("", "reviews-v2.example.internal", p.http, "/")
		if err != nil || code != 200 {
			t.Fatalf("subset host: %d %v", code, err)
		}
		e.checkReport("subset host", r, "reviews-v2", target("reviews", p.http, "v2"), alpnHTTP)
	})

	t.Run("ForgedHeaders", func(t *testing.T) {
		e.t = t
		// What a legacy VM might send to claim a mesh identity or steer the proxy.
		forged := http.Header{
			"X-Forwarded-Client-Cert":        {"By=" + productpageID + ";URI=spiffe://cluster.local/ns/payments/sa/admin"},
			"X-Envoy-Upstream-Rq-Timeout-Ms": {"1"},
			"X-Envoy-Max-Retries":            {"5"},
			"X-Envoy-Retry-On":               {"5xx"},
			"X-Envoy-Peer-Metadata":          {"ChwKDkFQUF9DT05UQUlORVJTEgoaCGFkbWluLTA="},
			"X-Envoy-Peer-Metadata-Id":       {"sidecar~10.0.0.9~admin-0.payments~payments.svc.cluster.local"},
			"X-Envoy-Original-Path":          {"/admin"},
			"X-Envoy-Decorator-Operation":    {"admin.payments.svc.cluster.local:80/*"},
			"X-Envoy-Internal":               {"true"},
			"X-Envoy-External-Address":       {"10.9.9.9"},
			"X-Request-Id":                   {"00000000-0000-4000-8000-000000000000"},
		}
		for _, host := range []string{"productpage.bookinfo.svc.cluster.local", "ratings.bookinfo.svc.cluster.local"} {
			port, service, id, alpn := p.http, "productpage", productpageID, alpnHTTP
			if strings.HasPrefix(host, "ratings") {
				port, service, id, alpn = p.h2, "ratings", ratingsID, alpnH2
			}
			code, answer, r, err := e.exchange("", host, port, "/forged", forged)
			if err != nil || code != 200 {
				t.Fatalf("%s: %d %v %v", host, code, err, r.Fields)
			}
			// The sidecar decoded fwdproxy's peer metadata (mesh.peerMetadata), not the VM's, and
			// its answer in kind stayed in the mesh.
			if r.Peer != "fwdproxy.fwdproxy" || r.PeerMetadata == nil || r.PeerMetadata.CanonicalService != "legacy-vms" ||
				r.PeerMetadata.CanonicalRevision != "v1" || r.PeerMetadata.App != "legacy-vms" || r.PeerMetadata.Version != "v1" ||
				!strings.HasPrefix(r.PeerID, "sidecar~0.0.0.0~fwdproxy-") {
				t.Errorf("%s: the sidecar decoded peer %q (%+v), id %q; want the fleet's workload fwdproxy.fwdproxy", host, r.Peer, r.PeerMetadata, r.PeerID)
			}
			for _, k := range []string{"X-Envoy-Peer-Metadata", "X-Envoy-Peer-Metadata-Id"} {
				if v := answer.Values(k); len(v) > 0 {
					t.Errorf("%s: the VM received the sidecar's %s %q", host, k, v)
				}
			}
			e.checkReport(host, r, service, target(service, port, ""), alpn)
			// Exactly one XFCC entry: the sidecar's, for fwdproxy's certificate.
			elems, err := meshtest.ParseXFCC(r.XFCC)
			if err != nil {
				t.Fatal(err)
			}
			if len(elems) != 1 {
				t.Fatalf("%s: the application saw XFCC %q, want only the sidecar's entry", host, r.XFCC)
			}
			// HAProxy cannot read a URI SAN, so its entry has none; the hash still names the
			// certificate.
			uri := []string{fleetID}
			if e.mesh.kind == "debian" {
				uri = nil
			}
			sum := sha256.Sum256(e.fleetLeaf.Raw)
			if x := elems[0]; !slices.Equal(x["By"], []string{id}) || !slices.Equal(x["Hash"], []string{hex.EncodeToString(sum[:])}) ||
				!slices.Equal(x["URI"], uri) {
				t.Errorf("%s: XFCC entry %v, want By=%s, the hash of fwdproxy's certificate and URI %q", host, x, id, uri)
			}
			if len(r.Headers) == 0 {
				t.Fatalf("%s: the report names no headers the application received", host)
			}
			for _, h := range r.Headers {
				if strings.HasPrefix(h, "x-envoy-") && h != "x-envoy-external-address" {
					t.Errorf("%s: the application received %s", host, h)
				}
			}
			if r.ExternalAddress != "127.0.0.1" {
				t.Errorf("%s: x-envoy-external-address %q, want the client's 127.0.0.1", host, r.ExternalAddress)
			}
			if r.RequestID == forged.Get("X-Request-Id") || len(r.RequestID) != 36 {
				t.Errorf("%s: x-request-id %q, want a new one", host, r.RequestID)
			}
		}
	})

	t.Run("HTTP2Upstream", func(t *testing.T) {
		e.t = t
		code, r, err := e.get("", "ratings.bookinfo.svc.cluster.local", p.h2, "/ratings/1")
		if err != nil || code != 200 {
			t.Fatalf("ratings: %d %v %v", code, err, r.Fields)
		}
		e.checkReport("ratings", r, "ratings", target("ratings", p.h2, ""), alpnH2)
		if r.Proto != "HTTP/2.0" {
			t.Errorf("sidecar saw %s, want HTTP/2.0 with prior knowledge", r.Proto)
		}
		// A client speaking HTTP/2 with prior knowledge to an HTTP/1.1 service.
		var protos http.Protocols
		protos.SetUnencryptedHTTP2(true)
		h2c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Protocols: &protos}}
		defer h2c.CloseIdleConnections()
		req, err := http.NewRequest("GET", "http://127.0.0.1:"+strconv.Itoa(p.http)+"/h2c", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = "productpage.example.internal"
		resp, err := h2c.Do(req)
		if err != nil {
			t.Fatalf("h2c client: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Fatalf("h2c client: %s %s: %s", resp.Proto, resp.Status, body)
		}
		r, err = meshtest.ParseReport(string(body))
		if err != nil {
			t.Fatal(err)
		}
		e.checkReport("h2c client", r, "productpage", target("productpage", p.http, ""), alpnHTTP)
		if r.Proto != "HTTP/1.1" {
			t.Errorf("sidecar saw %s, want HTTP/1.1", r.Proto)
		}
	})

	t.Run("TCPByPort", func(t *testing.T) {
		e.t = t
		for i := range 3 {
			r, err := e.tcp("")
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
			e.checkReport("tcp", r, "mysql", target("mysql", p.tcp, ""), alpnTCP)
		}
	})

	// The VM's client receives exactly the application's bytes: no metadata-exchange header
	// (or anything else) from the sidecar ahead of them, whoever speaks first.
	t.Run("TCPExactBytes", func(t *testing.T) {
		e.t = t
		// Server first (like MySQL): the first byte read is the application's.
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p.tcp), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		first, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil || !strings.HasPrefix(first, "service=mysql ") {
			t.Errorf("server first: first line %q, %v; want the application's report line", first, err)
		}
		// Client first (like Redis): the client writes before reading anything.
		c, err = net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p.tcp), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		msg := "PING client-first\n"
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		first, err = br.ReadString('\n')
		if err != nil || !strings.HasPrefix(first, "service=mysql ") {
			t.Errorf("client first: first line %q, %v; want the application's report line", first, err)
		}
		if e.mesh.echo {
			if got, err := br.ReadString('\n'); err != nil || got != msg {
				t.Errorf("client first: echo %q, %v; want %q", got, err, msg)
			}
		}
	})

	t.Run("WrongSidecarIdentityFailsClosed", func(t *testing.T) {
		e.t = t
		for range 3 {
			code, r, err := e.get("", "impostor.bookinfo.svc.cluster.local", p.http, "/secret")
			if err == nil && code == 200 {
				t.Fatalf("request served by a sidecar with the wrong identity: %v", r.Fields)
			}
			if err == nil && code < 500 {
				t.Errorf("status %d, want a 5xx", code)
			}
		}
		// Rejected > 0: the connection reached the sidecar and the client ended the handshake.
		// The sidecar counts it once its handshake returns, which can be after the client's 502.
		e.eventually("the impostor sidecar refused handshakes and served nothing", func() error {
			if st, ok := e.mesh.stats("impostor"); ok && (st.Served != 0 || st.Rejected == 0) {
				return fmt.Errorf("impostor sidecar: %+v, want handshakes refused by the client and nothing served", st)
			}
			return nil
		})
		cl := `cluster="outbound|` + strconv.Itoa(p.http) + `||impostor.bookinfo.svc.cluster.local"`
		if n := e.metric("fwdproxy_dataplane_tls_handshake_failures_total", cl); e.builtin && n < 3 {
			t.Errorf("fwdproxy_dataplane_tls_handshake_failures_total{%s} = %v, want >= 3", cl, n)
		}
	})

	t.Run("AllowedClients", func(t *testing.T) {
		e.t = t
		code, r, err := e.get("127.0.0.1", "details.bookinfo.svc.cluster.local", p.http, "/")
		if err != nil || code != 200 {
			t.Fatalf("from 127.0.0.1: %d %v", code, err)
		}
		e.checkReport("details", r, "details", target("details", p.http, ""), alpnHTTP)
		before, _ := e.mesh.stats("details")
		code, _, err = e.get("127.0.0.2", "details.bookinfo.svc.cluster.local", p.http, "/")
		if err != nil || code != http.StatusForbidden {
			t.Errorf("HTTP from 127.0.0.2: %d %v, want 403", code, err)
		}
		// Other services on the same port keep serving that client.
		if code, _, err := e.get("127.0.0.2", "productpage.bookinfo.svc.cluster.local", p.http, "/"); err != nil || code != 200 {
			t.Errorf("productpage from 127.0.0.2: %d %v, want 200", code, err)
		}
		if _, err := e.tcp("127.0.0.1"); err != nil {
			t.Errorf("TCP from 127.0.0.1: %v", err)
		}
		if r, err := e.tcp("127.0.0.2"); err == nil {
			t.Errorf("TCP from 127.0.0.2 reached the sidecar: %v", r.Fields)
		}
		if after, ok := e.mesh.stats("details"); ok && after.Served != before.Served {
			t.Errorf("details served %d requests to a refused client", after.Served-before.Served)
		}
		for _, port := range []int{p.http, p.tcp} {
			l := `listener="127.0.0.1_` + strconv.Itoa(port) + `"`
			if n := e.metric("fwdproxy_dataplane_rbac_denied_total", l); e.builtin && n != 1 {
				t.Errorf("fwdproxy_dataplane_rbac_denied_total{%s} = %v, want 1", l, n)
			}
		}
	})

	t.Run("CatalogChangeUnderLoad", func(t *testing.T) {
		e.t = t
		if code, _, _ := e.get("", "added.bookinfo.svc.cluster.local", p.http, "/"); code == 200 {
			t.Fatal("added service reachable before it is in the catalog")
		}
		l := e.startLoad()
		l.progress(t, 20)
		// A broken edit is rejected; the last good catalog keeps serving.
		e.replaceCatalog("services:\n  - host: added.bookinfo.svc.cluster.local\n    ports: [{number: 0, protocol: http}]\n")
		e.eventually("broken catalog reported", func() error {
			if !strings.Contains(e.logs.String(), "services[0].ports[0].number") {
				return errors.New("no log line names the bad field")
			}
			return nil
		})
		l.progress(t, 20)
		if code, _, _ := e.get("", "added.bookinfo.svc.cluster.local", p.http, "/"); code == 200 {
			t.Error("a service from the rejected catalog is served")
		}
		e.writeCatalog(true)
		e.eventually("added service reachable", func() error {
			code, r, err := e.get("", "added.bookinfo.svc.cluster.local", p.http, "/")
			if err != nil || code != 200 {
				return fmt.Errorf("%d %v", code, err)
			}
			e.checkReport("added", r, "added", target("added", p.http, ""), alpnHTTP)
			return nil
		})
		l.progress(t, 20)
		l.finish(t)
	})

	t.Run("IdentityRotationUnderLoad", func(t *testing.T) {
		e.t = t
		l := e.startLoad()
		l.progress(t, 20)
		r, err := e.tcp("")
		if err != nil {
			t.Fatal(err)
		}
		old := r.Serial
		// A certificate from another CA is rejected; the last good identity keeps serving.
		otherCA, err := meshtest.NewCA("other")
		if err != nil {
			t.Fatal(err)
		}
		foreign, err := otherCA.IssueFor(fleetID, 2*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, _, err := foreign.WriteFiles(e.certs, e.ca.RootPEM); err != nil {
			t.Fatal(err)
		}
		e.eventually("foreign identity rejected", func() error {
			if !strings.Contains(e.logs.String(), "identity files rejected") {
				return errors.New("no log line reports the rejected identity files")
			}
			return nil
		})
		l.progress(t, 20)
		if r, err := e.tcp(""); err != nil || r.Serial != old {
			t.Errorf("after a rejected identity: serial %s, %v; want the last good %s", r.Serial, err, old)
		}
		e.rotateFleetCert()
		l.progress(t, 20)
		l.finish(t)
	})

	t.Run("GatewayDown", func(t *testing.T) {
		e.t = t
		// Both gateways carried traffic so far (round robin), so the one taken away had a share.
		for i := range e.mesh.gateways {
			if n, ok := e.mesh.routed(i); ok && n == 0 {
				t.Fatalf("gateway %d carried no connection before it was stopped", i)
			}
		}
		e.mesh.stopGateway(1)
		failed := 0
		for i := range 40 {
			if code, _, err := e.get("", "productpage.bookinfo.svc.cluster.local", p.http, "/"); err != nil || code != 200 {
				failed++
				t.Logf("request %d: %d %v", i, code, err)
			}
			if _, err := e.tcp(""); err != nil {
				failed++
				t.Logf("connection %d: %v", i, err)
			}
		}
		// Without connect retries (Envoy's default), each cluster may fail until the dead
		// gateway is ejected.
		allowed := 0
		if !e.failover {
			allowed = 2 * consecutiveErrors
		}
		if failed > allowed {
			t.Errorf("%d of 80 requests and connections failed with one gateway down; want at most %d", failed, allowed)
		}
		for _, cl := range []string{
			`cluster="outbound|` + strconv.Itoa(p.http) + `||productpage.bookinfo.svc.cluster.local"`,
			`cluster="outbound|` + strconv.Itoa(p.tcp) + `||mysql.bookinfo.svc.cluster.local"`,
		} {
			if n := e.metric("fwdproxy_dataplane_ejections_total", cl); e.builtin && n < 1 {
				t.Errorf("fwdproxy_dataplane_ejections_total{%s} = %v: the stopped gateway was not ejected", cl, n)
			}
		}
	})
}

// metric sums the samples of a counter on the daemon's /metrics whose labels include label (e.g.
// `cluster="outbound|9080||x"`).
func (e *env) metric(name, label string) float64 {
	e.t.Helper()
	resp, err := http.Get("http://" + e.metrics + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	sum := 0.0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, label) {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			e.t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// eventually retries f for up to 20s.
func (e *env) eventually(what string, f func() error) {
	e.t.Helper()
	eventually(e.t, what, f)
}

// load is steady traffic: HTTP workers on productpage and a TCP worker, counting failures.
type load struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
	stop       chan struct{}
	stopped    sync.Once
	wg         sync.WaitGroup
}

func (e *env) startLoad() *load {
	productpage := func() error {
		code, r, err := e.get("", "productpage.bookinfo.svc.cluster.local", e.ports.http, "/")
		if err != nil {
			return err
		}
		if code != 200 || r.Service != "productpage" {
			return fmt.Errorf("status %d service %q", code, r.Service)
		}
		return nil
	}
	return runLoad(productpage, productpage, productpage, func() error {
		r, err := e.tcp("")
		if err == nil && r.Service != "mysql" {
			err = errors.New("tcp: wrong service " + r.Service)
		}
		return err
	})
}

// runLoad runs one worker per call, each repeating its call (a bounded number of times) until
// the load is halted, counting successes and keeping the first failures.
func runLoad(calls ...func() error) *load {
	l := &load{stop: make(chan struct{})}
	for _, do := range calls {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for range 100000 {
				select {
				case <-l.stop:
					return
				default:
				}
				if err := do(); err != nil {
					l.failed.Add(1)
					l.mu.Lock()
					if len(l.errs) < 5 {
						l.errs = append(l.errs, err.Error())
					}
					l.mu.Unlock()
				} else {
					l.ok.Add(1)
				}
			}
		}()
	}
	return l
}

// progress waits until n more requests have succeeded (at most 30s), so each phase of a test
// carries traffic however busy the machine is.
func (l *load) progress(t *testing.T, n int64) {
	t.Helper()
	want := l.ok.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.ok.Load() < want {
		if time.Now().After(deadline) {
			l.halt()
			t.Fatalf("load made no progress: %d ok, %d failed, e.g. %q", l.ok.Load(), l.failed.Load(), l.errs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// halt stops the workers and waits for them.
func (l *load) halt() {
	l.stopped.Do(func() { close(l.stop) })
	l.wg.Wait()
}

func (l *load) finish(t *testing.T) {
	t.Helper()
	l.halt()
	t.Logf("load: %d ok, %d failed", l.ok.Load(), l.failed.Load())
	if l.failed.Load() != 0 {
		t.Errorf("%d requests failed under load, e.g. %q", l.failed.Load(), l.errs)
	}
	if l.ok.Load() < 40 {
		t.Errorf("only %d requests succeeded under load", l.ok.Load())
	}
}

func TestBuiltinGoMesh(t *testing.T)     { runSuite(t, goMesh, builtin) }
func TestBuiltinDebianMesh(t *testing.T) { runSuite(t, debianMesh, builtin) }

// envoyDataplane is the daemon supervising a real Envoy (dataplane: envoy), which takes its
// configuration over ADS/SDS from the daemon's own bootstrap. Like the built-in data plane, it
// retries a failed connect on another gateway (route retry policy, tcp_proxy connect attempts).
func envoyDataplane(t *testing.T) dataplane { return envoyDrainingFor(t, time.Second) }

// envoyDrainingFor is the Envoy data plane with envoy.drainTime drain.
func envoyDrainingFor(t *testing.T, drain time.Duration) dataplane {
	bin, err := meshtest.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	return dataplane{name: "envoy", failover: true, configure: func(t testing.TB, dir string) string {
		return fmt.Sprintf("dataplane: envoy\nenvoy: {binary: %s, adminAddress: 127.0.0.1:%d, bootstrapPath: %s, drainTime: %s}\n",
			bin, freePort(t), filepath.Join(dir, "envoy-bootstrap.json"), drain)
	}}
}

func TestEnvoyGoMesh(t *testing.T)     { runSuite(t, goMesh, envoyDataplane(t)) }
func TestEnvoyDebianMesh(t *testing.T) { runSuite(t, debianMesh, envoyDataplane(t)) }

func TestBuiltinEnvoyMesh(t *testing.T) { runSuite(t, envoyMesh, builtin) }
func TestEnvoyEnvoyMesh(t *testing.T)   { runSuite(t, envoyMesh, envoyDataplane(t)) }

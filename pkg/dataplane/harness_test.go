package dataplane

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

const (
	fleetID   = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	reviewsID = "spiffe://cluster.local/ns/default/sa/reviews"
)

func testLog(t testing.TB) *slog.Logger {
	if os.Getenv("DATAPLANE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) uint32 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint32(l.Addr().(*net.TCPAddr).Port)
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	meshtest.Eventually(t, 10*time.Second, what, cond)
}

// env is a control plane on loopback and a data plane connected to it.
type env struct {
	t       testing.TB
	ca      *meshtest.CA
	bundle  *identity.Bundle
	cp      *controlplane.Server
	cpAddr  string
	grpc    *grpc.Server
	dp      *DataPlane
	reg     *prometheus.Registry
	access  *meshtest.SyncBuffer
	done    chan struct{}
	cancel  context.CancelFunc
	outlier controlplane.Outlier
}

func newEnv(t testing.TB, drain time.Duration) *env {
	t.Helper()
	return newEnvWith(t, drain, nil)
}

// newEnvWith is newEnv with the data plane's options edited by tune.
func newEnvWith(t testing.TB, drain time.Duration, tune func(*Options)) *env {
	t.Helper()
	ca, err := meshtest.NewCA("mesh")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ca: ca, reg: prometheus.NewRegistry(), access: &meshtest.SyncBuffer{}, done: make(chan struct{}),
		outlier: controlplane.Outlier{ConsecutiveErrors: 5, Interval: time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50}}
	e.bundle = e.issueFleet()
	e.cp = controlplane.NewServer(testLog(t), nil)
	e.startControlPlane("127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	o := Options{ServerAddress: e.cpAddr, NodeID: "test", NodeCluster: "fwdproxy", Log: testLog(t),
		Registerer: e.reg, DrainTime: drain, AccessLog: e.access, MaxBackoff: 200 * time.Millisecond}
	if tune != nil {
		tune(&o)
	}
	e.dp = New(o)
	go func() {
		defer close(e.done)
		if err := e.dp.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	t.Cleanup(e.close)
	return e
}

func (e *env) close() {
	e.cancel()
	<-e.done
	e.grpc.Stop()
}

func (e *env) startControlPlane(addr string) {
	e.t.Helper()
	var lis net.Listener
	var err error
	for range 50 { // after a restart the port may take a moment to be free again
		if lis, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	e.cpAddr = lis.Addr().String()
	e.grpc = grpc.NewServer()
	e.cp.Register(e.grpc)
	go func() { _ = e.grpc.Serve(lis) }()
}

func (e *env) issueFleet() *identity.Bundle {
	e.t.Helper()
	leaf, err := e.ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	b, err := identity.New(fleetID, leaf.ChainPEM, leaf.KeyPEM, e.ca.RootPEM, time.Now())
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

func (e *env) options(gws ...netip.AddrPort) controlplane.Options {
	return controlplane.Options{
		ListenAddress:  "127.0.0.1",
		Gateways:       []controlplane.Gateway{{Name: "eastwest", Addresses: gws}},
		ConnectTimeout: 2 * time.Second,
		Outlier:        e.outlier,
		AccessLog:      true,
	}
}

// push translates cat, lets mod edit the resources, serves them and waits until the data
// plane applied them.
func (e *env) push(cat *catalog.Catalog, opts controlplane.Options, mod func(*controlplane.Resources)) *controlplane.Snapshot {
	e.t.Helper()
	cat.Normalize()
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		e.t.Fatal(err)
	}
	if mod != nil {
		mod(res)
	}
	snap, err := controlplane.NewSnapshot(res, e.bundle)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := e.cp.Set(context.Background(), snap); err != nil {
		e.t.Fatal(err)
	}
	return snap
}

// pushApplied pushes and waits until the data plane accepted every type of the snapshot.
func (e *env) pushApplied(cat *catalog.Catalog, opts controlplane.Options, mod func(*controlplane.Resources)) *controlplane.Snapshot {
	e.t.Helper()
	snap := e.push(cat, opts, mod)
	e.waitApplied(snap)
	return snap
}

func (e *env) waitApplied(snap *controlplane.Snapshot) {
	e.t.Helper()
	eventually(e.t, "the data plane to apply the snapshot", func() bool {
		st := e.dp.Status()
		for typ, name := range map[string]string{resource.ListenerType: "listener", resource.ClusterType: "cluster",
			resource.RouteType: "route", resource.EndpointType: "endpoint", resource.SecretType: "secret"} {
			if v := snap.Cache.GetVersion(typ); v != "" && st.Versions[name] != v && len(snap.Cache.GetResources(typ)) > 0 {
				return false
			}
		}
		return st.Ready
	})
}

func counter(t testing.TB, c prometheus.Collector) float64 {
	t.Helper()
	return testutil.ToFloat64(c)
}

// meshServer stands in for the east-west gateway and the service's sidecar in one: it
// terminates mTLS, requires a client chain to the mesh root (so the client must send its
// intermediate), and reports what it saw.
type meshServer struct {
	t       testing.TB
	ln      net.Listener
	addr    netip.AddrPort
	mu      sync.Mutex
	hellos  []hello
	clients []*x509.Certificate
	accepts atomic.Int64
	resumed atomic.Int64 // handshakes that resumed a TLS session
	srv     *http.Server
	// requests are the HTTP requests received, in order.
	requests []seenRequest
	// floodsAbandoned counts /flood answers given up on a reader that stopped reading.
	floodsAbandoned atomic.Int64
}

// seenRequest is what the service behind the mesh server received.
type seenRequest struct {
	path   string
	header http.Header
}

// received returns the HTTP requests the mesh server received so far.
func (m *meshServer) received() []seenRequest {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.requests)
}

// hits counts the requests for path.
func (m *meshServer) hits(path string) int {
	n := 0
	for _, r := range m.received() {
		if r.path == path {
			n++
		}
	}
	return n
}

type hello struct {
	sni  string
	alpn []string
}

func (m *meshServer) last() (hello, *x509.Certificate) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var h hello
	var c *x509.Certificate
	if len(m.hellos) > 0 {
		h = m.hellos[len(m.hellos)-1]
	}
	if len(m.clients) > 0 {
		c = m.clients[len(m.clients)-1]
	}
	return h, c
}

func (m *meshServer) handshakes() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.clients)
}

func newMeshServer(t testing.TB, ca *meshtest.CA, serverID string, tcp bool) *meshServer {
	t.Helper()
	leaf, err := ca.IssueFor(serverID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(leaf.ChainPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Root) // the root only: the client has to send its intermediate
	m := &meshServer{t: t}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    roots,
		MinVersion:   tls.VersionTLS12,
		GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			m.mu.Lock()
			m.hellos = append(m.hellos, hello{sni: chi.ServerName, alpn: chi.SupportedProtos})
			m.mu.Unlock()
			return nil, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			m.mu.Lock()
			m.clients = append(m.clients, cs.PeerCertificates[0])
			m.mu.Unlock()
			if cs.DidResume {
				m.resumed.Add(1)
			}
			return nil
		},
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	m.ln = ln
	m.addr = netip.MustParseAddrPort(ln.Addr().String())
	t.Cleanup(func() { ln.Close() })
	if tcp {
		go m.serveTCP()
		return m
	}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // the sidecar detects h2 by its preface; no ALPN h2
	m.srv = &http.Server{Protocols: protocols, Handler: http.HandlerFunc(m.handle),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, tlsStateKey{}, c.(*handshaked).state)
		}}
	go func() { _ = m.srv.Serve(&handshakeListener{Listener: ln, m: m}) }()
	t.Cleanup(func() { m.srv.Close() })
	return m
}

type tlsStateKey struct{}

// handshaked hides the *tls.Conn so that the HTTP server treats it as a plain connection and
// accepts HTTP/2 by prior knowledge, as an Istio sidecar does.
type handshaked struct {
	net.Conn
	state tls.ConnectionState
}

type handshakeListener struct {
	net.Listener
	m *meshServer
}

func (l *handshakeListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.m.accepts.Add(1)
		tc := c.(*tls.Conn)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err != nil {
			tc.Close()
			continue
		}
		_ = tc.SetDeadline(time.Time{})
		return &handshaked{Conn: tc, state: tc.ConnectionState()}, nil
	}
}

func (m *meshServer) handle(w http.ResponseWriter, r *http.Request) {
	st := r.Context().Value(tlsStateKey{}).(tls.ConnectionState)
	m.mu.Lock()
	m.requests = append(m.requests, seenRequest{path: r.URL.Path, header: r.Header.Clone()})
	m.mu.Unlock()
	if r.URL.Path == "/fail" {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	if r.URL.Path == "/then-close" { // answer as if keeping the connection, then close it
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			m.t.Errorf("hijack: %v", err)
			return
		}
		_, _ = bw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye\n")
		_ = bw.Flush()
		conn.Close()
		return
	}
	if r.URL.Path == "/flood" { // write until the client stops taking bytes, then give up
		rc := http.NewResponseController(w)
		chunk := make([]byte, 64<<10)
		for range 4096 {
			_ = rc.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
			if _, err := w.Write(chunk); err != nil {
				m.floodsAbandoned.Add(1)
				panic(http.ErrAbortHandler)
			}
		}
		return
	}
	if r.URL.Path == "/slow" {
		time.Sleep(500 * time.Millisecond)
	}
	answerPeerMetadata(w, r)
	w.Header().Set("X-Seen-Sni", st.ServerName)
	w.Header().Set("X-Seen-Client", st.PeerCertificates[0].URIs[0].String())
	w.Header().Set("X-Seen-Serial", st.PeerCertificates[0].SerialNumber.String())
	w.Header().Set("X-Seen-Proto", r.Proto)
	w.Header().Set("X-Seen-Host", r.Host)
	w.Header().Set("X-Seen-Xff", r.Header.Get("X-Forwarded-For"))
	w.Header().Set("X-Seen-Request-Id", r.Header.Get("X-Request-Id"))
	w.Header().Set("X-Seen-Private", r.Header.Get("X-Private"))
	body, _ := io.ReadAll(r.Body)
	fmt.Fprintf(w, "hello %s %s", r.URL.Path, body)
}

// serveTCP greets with the caller's identity, echoes lines until EOF, then says bye and closes.
func (m *meshServer) serveTCP() {
	for {
		c, err := m.ln.Accept()
		if err != nil {
			return
		}
		m.accepts.Add(1)
		go func() {
			defer c.Close()
			tc := c.(*tls.Conn)
			if err := tc.Handshake(); err != nil {
				return
			}
			st := tc.ConnectionState()
			fmt.Fprintf(tc, "hi %s serial=%s sni=%s\n", st.PeerCertificates[0].URIs[0], st.PeerCertificates[0].SerialNumber, st.ServerName)
			r := bufio.NewReader(tc)
			for {
				line, err := r.ReadString('\n')
				if line != "" {
					if _, werr := io.WriteString(tc, line); werr != nil {
						return
					}
				}
				if err != nil {
					if errors.Is(err, io.EOF) {
						_, _ = io.WriteString(tc, "bye\n")
					}
					return
				}
			}
		}()
	}
}

func reviews(port uint32, proto catalog.Protocol, aliases ...string) catalog.Service {
	return catalog.Service{
		Host: "reviews.default.svc.cluster.local", Aliases: aliases,
		Ports:      []catalog.Port{{Number: port, Protocol: proto}},
		Identities: []string{reviewsID},
	}
}

// get sends a request with a Host header to the data plane's listener on port.
func get(t testing.TB, c *http.Client, port uint32, host, path string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func body(t testing.TB, r *http.Response) string {
	t.Helper()
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// tcpConn is a client connection to a TCP listener of the data plane.
type tcpConn struct {
	*net.TCPConn
	r *bufio.Reader
}

func dialTCP(t testing.TB, port uint32) *tcpConn {
	t.Helper()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &tcpConn{TCPConn: c.(*net.TCPConn), r: bufio.NewReader(c)}
}

func (c *tcpConn) line(t testing.TB) string {
	t.Helper()
	s, err := c.r.ReadString('\n')
	if err != nil {
		t.Fatalf("read: %v (got %q)", err, s)
	}
	return s
}

func (c *tcpConn) ping(t testing.TB, msg string) {
	t.Helper()
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		t.Fatal(err)
	}
	if got := c.line(t); got != msg+"\n" {
		t.Fatalf("echo %q, want %q", got, msg)
	}
}

// answerPeerMetadata answers as an Istio sidecar's inbound filter does a caller that sent peer
// metadata: with its own.
func answerPeerMetadata(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(meshtest.PeerMetadataIDHeader) != "" {
		w.Header().Set(meshtest.PeerMetadataIDHeader, "sidecar~10.1.0.7~reviews-v1-0.bookinfo~bookinfo.svc.cluster.local")
	}
	if r.Header.Get(meshtest.PeerMetadataHeader) != "" {
		own, _ := meshtest.PeerMetadataValue(map[string]string{"NAME": "reviews-v1-0", "NAMESPACE": "bookinfo", "WORKLOAD_NAME": "reviews-v1"})
		w.Header().Set(meshtest.PeerMetadataHeader, own)
	}
}

// h2cClient speaks HTTP/2 with prior knowledge over plain TCP, as a downstream h2c client does.
func h2cClient(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &p, DialContext: dial}}
}

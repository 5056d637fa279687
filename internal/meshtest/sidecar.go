package meshtest

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// IstioALPN is every ALPN protocol an Istio sidecar accepts as mesh mTLS (allIstioMtlsALPNs).
var IstioALPN = []string{"istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"}

// Protocol of a sidecar's application.
const (
	// HTTP answers HTTP/1.1 and HTTP/2 with prior knowledge, with a Report line as the body.
	HTTP = "http"
	// TCP writes a Report line, then echoes what it receives.
	TCP = "tcp"
)

// SidecarOptions configure a sidecar stand-in.
type SidecarOptions struct {
	// Name is reported as service=.
	Name string
	// SPIFFEID the sidecar's certificate carries.
	SPIFFEID string
	// CA issues the sidecar's certificate and is the only trust anchor for clients: a client must
	// send its intermediate.
	CA *CA
	// Protocol is HTTP, TCP or GRPC.
	Protocol string
	// Addr to listen on; default 127.0.0.1:0.
	Addr string
	// DNSNames are added to the sidecar's certificate besides its SPIFFE ID, for clients that
	// can only check a DNS name (HAProxy checks the SNI); Istio's certificates have none.
	DNSNames []string
	// AllowedCallers, when set, are the only SPIFFE IDs served (an AuthorizationPolicy): others get
	// HTTP 403 or a closed TCP connection after the handshake.
	AllowedCallers []string
}

// SidecarStats counts what a sidecar did.
type SidecarStats struct {
	Handshakes int64 // mTLS handshakes completed
	Rejected   int64 // handshakes refused: no client chain to the root, or no Istio ALPN
	Served     int64 // HTTP requests answered or TCP connections echoed
	Denied     int64 // callers refused by AllowedCallers
}

// Sidecar terminates Istio mTLS like a workload's sidecar and answers for the application.
type Sidecar struct {
	opts   SidecarOptions
	ln     net.Listener
	cert   tls.Certificate
	roots  *x509.CertPool
	httpCh chan net.Conn
	srv    *http.Server
	echo   *EchoServer // the application of a GRPC sidecar
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}

	handshakes, rejected, served, denied atomic.Int64
	lastErr                              atomic.Value // string
}

// StartSidecar issues the sidecar's certificate and starts serving.
func StartSidecar(o SidecarOptions) (*Sidecar, error) {
	if o.CA == nil || o.SPIFFEID == "" {
		return nil, errors.New("meshtest: sidecar needs a CA and a SPIFFE ID")
	}
	if o.Protocol != HTTP && o.Protocol != TCP && o.Protocol != GRPC {
		return nil, fmt.Errorf("meshtest: sidecar protocol %q: use http, tcp or grpc", o.Protocol)
	}
	if o.Addr == "" {
		o.Addr = "127.0.0.1:0"
	}
	now := time.Now()
	leaf, err := o.CA.IssueWithDNS(o.SPIFFEID, o.DNSNames, now.Add(-time.Minute), now.Add(24*time.Hour))
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(leaf.ChainPEM, leaf.KeyPEM)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", o.Addr)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(o.CA.Root)
	s := &Sidecar{opts: o, ln: ln, cert: cert, roots: roots, conns: map[net.Conn]struct{}{}}
	if o.Protocol == GRPC {
		if s.echo, err = NewEchoServer(); err != nil {
			ln.Close()
			return nil, err
		}
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if o.Protocol != TCP {
		s.httpCh = make(chan net.Conn)
		var protos http.Protocols
		protos.SetHTTP1(true)
		protos.SetUnencryptedHTTP2(true) // TLS is terminated here; h2 arrives by prior knowledge
		s.srv = &http.Server{
			Handler:           http.HandlerFunc(s.serveHTTP),
			Protocols:         &protos,
			ReadHeaderTimeout: 10 * time.Second,
			ConnContext: func(ctx context.Context, c net.Conn) context.Context {
				if mc, ok := c.(*meshConn); ok {
					return context.WithValue(ctx, meshConnKey{}, mc)
				}
				return ctx
			},
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			_ = s.srv.Serve(&chanListener{ch: s.httpCh, addr: ln.Addr(), ctx: s.ctx})
		}()
	}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

// Addr is the sidecar's listening address.
func (s *Sidecar) Addr() string { return s.ln.Addr().String() }

// SPIFFEID is the identity the sidecar presents.
func (s *Sidecar) SPIFFEID() string { return s.opts.SPIFFEID }

// Stats returns the sidecar's counters.
func (s *Sidecar) Stats() SidecarStats {
	return SidecarStats{Handshakes: s.handshakes.Load(), Rejected: s.rejected.Load(), Served: s.served.Load(), Denied: s.denied.Load()}
}

// LastError is the last handshake failure, "" if none.
func (s *Sidecar) LastError() string {
	e, _ := s.lastErr.Load().(string)
	return e
}

// Close stops the sidecar and cuts its connections.
func (s *Sidecar) Close() error {
	s.cancel()
	err := s.ln.Close()
	if s.srv != nil {
		_ = s.srv.Close()
	}
	if s.echo != nil {
		s.echo.Stop()
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

func (s *Sidecar) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if !s.handle(c) {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}
		}()
	}
}

// meshConn is a terminated mTLS connection with what the handshake told.
type meshConn struct {
	net.Conn
	caller, sni, serial string
	alpn                []string
	peer                *x509.Certificate // the caller's leaf
	onClose             func()
	closeOnce           sync.Once
}

func (m *meshConn) Close() error {
	err := m.Conn.Close()
	m.closeOnce.Do(m.onClose)
	return err
}

type meshConnKey struct{}

func (m *meshConn) report(service string) string {
	alpn := strings.Join(m.alpn, ",")
	if alpn == "" {
		alpn = "-"
	}
	return fmt.Sprintf("service=%s verify=SUCCESS caller=%s serial=%s sni=%s alpn=%s", service, m.caller, m.serial, m.sni, alpn)
}

// Server ALPN of Istio's inbound chains: HTTP ports offer h2 and http/1.1 (so istio-http/1.1
// is not negotiated and the HTTP codec detects the protocol); TCP ports put istio-peer-exchange
// first, for the metadata exchange.
var (
	sidecarALPNHTTP = []string{"h2", "http/1.1"}
	sidecarALPNTCP  = []string{PeerExchangeALPN, "h2", "http/1.1"}
)

func (s *Sidecar) serverALPN() []string {
	if s.opts.Protocol == TCP {
		return sidecarALPNTCP
	}
	return sidecarALPNHTTP
}

// agreedALPN is what Envoy's server side negotiates: the first of its own protocols the client
// offered; none (and the handshake goes on without ALPN) when they share none. crypto/tls would
// refuse such a handshake, so the server is given only the shared protocols.
func agreedALPN(server, client []string) []string {
	for _, p := range server {
		if slices.Contains(client, p) {
			return []string{p}
		}
	}
	return nil
}

// handle terminates TLS; it returns false if the connection is done and may be closed.
func (s *Sidecar) handle(raw net.Conn) bool {
	mc := &meshConn{}
	conf := &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			mc.sni = h.ServerName
			mc.alpn = slices.Clone(h.SupportedProtos)
			if !slices.ContainsFunc(h.SupportedProtos, func(p string) bool { return slices.Contains(IstioALPN, p) }) {
				return nil, fmt.Errorf("no Istio ALPN offered (got %q): not mesh mTLS", h.SupportedProtos)
			}
			return &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Certificates: []tls.Certificate{s.cert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    s.roots,
				NextProtos:   agreedALPN(s.serverALPN(), h.SupportedProtos),
			}, nil
		},
	}
	tc := tls.Server(raw, conf)
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		s.rejected.Add(1)
		s.lastErr.Store(err.Error())
		return false
	}
	s.handshakes.Add(1)
	st := tc.ConnectionState()
	leaf := st.PeerCertificates[0]
	mc.Conn, mc.caller, mc.serial, mc.peer = tc, SPIFFEID(leaf), leaf.SerialNumber.Text(16), leaf
	mc.onClose = func() {
		s.mu.Lock()
		delete(s.conns, raw)
		s.mu.Unlock()
	}
	if mc.caller == "" {
		mc.caller = "-"
	}
	allowed := len(s.opts.AllowedCallers) == 0 || slices.Contains(s.opts.AllowedCallers, mc.caller)
	if s.opts.Protocol == TCP {
		if !allowed {
			s.denied.Add(1)
			return false
		}
		s.served.Add(1)
		if st.NegotiatedProtocol == PeerExchangeALPN {
			// Istio's metadata_exchange filter writes its node's metadata ahead of the
			// application's bytes when the client asked for the exchange.
			hdr, err := PeerExchangeHeader(sidecarMetadata(s.opts.Name))
			if err != nil {
				return false
			}
			if _, err := tc.Write(hdr); err != nil {
				return false
			}
		}
		if _, err := io.WriteString(tc, mc.report(s.opts.Name)+"\n"); err != nil {
			return false
		}
		_, _ = io.Copy(tc, tc)
		_ = tc.CloseWrite()
		return false
	}
	select {
	case s.httpCh <- mc:
		return true
	case <-s.ctx.Done():
		return false
	}
}

func (s *Sidecar) serveHTTP(w http.ResponseWriter, r *http.Request) {
	mc, _ := r.Context().Value(meshConnKey{}).(*meshConn)
	if mc == nil {
		http.Error(w, "no mesh connection", http.StatusInternalServerError)
		return
	}
	if len(s.opts.AllowedCallers) > 0 && !slices.Contains(s.opts.AllowedCallers, mc.caller) {
		s.denied.Add(1)
		http.Error(w, "RBAC: access denied", http.StatusForbidden)
		return
	}
	s.served.Add(1)
	if s.echo == nil {
		_, _ = io.Copy(io.Discard, r.Body)
	}
	// What an Istio sidecar's inbound connection manager does (APPEND_FORWARD, with subject, URI
	// and DNS): the application sees the caller's XFCC, if any, then the sidecar's own entry.
	xfcc := XFCCEntry(s.opts.SPIFFEID, mc.peer)
	if prior := r.Header.Values(XFCCHeader); len(prior) > 0 {
		xfcc = strings.Join(prior, ",") + "," + xfcc
	}
	r.Header.Set(XFCCHeader, xfcc)
	if s.echo != nil {
		s.echo.ServeHTTP(w, r)
		return
	}
	peer := inboundPeerMetadata(s.opts.Name, r.Header, w.Header())
	// ?delay=DURATION holds the answer, for requests that must be in flight during a drain.
	if d, err := time.ParseDuration(r.URL.Query().Get("delay")); err == nil && d > 0 {
		select {
		case <-time.After(min(d, time.Minute)):
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "%s host=%s proto=%s method=%s path=%s %s %s\n", mc.report(s.opts.Name), r.Host, r.Proto, r.Method, r.URL.Path, peer, headerReport(r.Header))
}

// XFCCHeader is the header Envoy passes client certificate details in.
const XFCCHeader = "X-Forwarded-Client-Cert"

// XFCCEntry is the x-forwarded-client-cert element an Istio sidecar (Envoy with
// forward_client_cert_details APPEND_FORWARD and set_current_client_cert_details subject, uri,
// dns) adds for a caller: By= its own SPIFFE ID, Hash= the SHA-256 of the caller's leaf (DER, hex),
// Subject= the caller's subject (quoted, empty for Istio certificates), URI= each caller URI SAN
// (URI= when none), DNS= each caller DNS SAN.
func XFCCEntry(by string, caller *x509.Certificate) string {
	sum := sha256.Sum256(caller.Raw)
	parts := []string{"By=" + by, "Hash=" + hex.EncodeToString(sum[:]), `Subject="` + caller.Subject.String() + `"`}
	if len(caller.URIs) == 0 {
		parts = append(parts, "URI=")
	}
	for _, u := range caller.URIs {
		parts = append(parts, "URI="+u.String())
	}
	for _, d := range caller.DNSNames {
		parts = append(parts, "DNS="+d)
	}
	return strings.Join(parts, ";")
}

// headerReport is the report fields that tell what headers the application received: its XFCC,
// x-request-id and x-envoy-external-address (query-escaped), and every header name.
func headerReport(h http.Header) string {
	names := make([]string, 0, len(h))
	for k := range h {
		names = append(names, strings.ToLower(k))
	}
	slices.Sort(names)
	return fmt.Sprintf("xfcc=%s requestid=%s external=%s headers=%s", url.QueryEscape(strings.Join(h.Values(XFCCHeader), ",")),
		url.QueryEscape(h.Get("X-Request-Id")), url.QueryEscape(h.Get("X-Envoy-External-Address")), strings.Join(names, ","))
}

// chanListener hands already-terminated connections to an http.Server.
type chanListener struct {
	ch   chan net.Conn
	addr net.Addr
	ctx  context.Context
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.ctx.Done():
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

// ReadReportLine reads the first line a TCP sidecar sends.
func ReadReportLine(r *bufio.Reader) (Report, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return Report{}, fmt.Errorf("reading report line: %w (got %q)", err, line)
	}
	return ParseReport(line)
}

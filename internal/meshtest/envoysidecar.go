//go:build linux

package meshtest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// envoyChainALPN are the ALPN names the sidecar's listener has a filter chain for: Istio's mTLS
// names and the sidecar's own (h2, http/1.1). See envoySidecarListener.
var envoyChainALPN = append(slices.Clone(IstioALPN), "h2", "http/1.1")

// noALPNChain names the chain of a ClientHello that offered none of envoyChainALPN.
const noALPNChain = "-"

// Headers the sidecar's Envoy sets toward its application with what it knows of the connection,
// replacing any the caller sent (substitution formatters).
var envoyFactHeaders = []struct{ key, value string }{
	{"x-meshtest-sni", "%REQUESTED_SERVER_NAME%"},
	{"x-meshtest-peer-uri", "%DOWNSTREAM_PEER_URI_SAN%"},
	{"x-meshtest-serial", "%DOWNSTREAM_PEER_SERIAL%"},
	{"x-meshtest-tls", "%DOWNSTREAM_TLS_VERSION%"},
	{"x-meshtest-alpn", "%FILTER_CHAIN_NAME%"},
	{"x-meshtest-proto", "%PROTOCOL%"},
}

func factHeaders(isHTTP bool) []*core.HeaderValueOption {
	var out []*core.HeaderValueOption
	for _, h := range envoyFactHeaders {
		if h.key == "x-meshtest-proto" && !isHTTP {
			continue
		}
		out = append(out, &core.HeaderValueOption{
			Header:       &core.HeaderValue{Key: h.key, Value: h.value},
			AppendAction: core.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	return out
}

// trustDomain is the trust domain of a SPIFFE ID, "" if it is not one.
func trustDomain(spiffeID string) string {
	u, err := url.Parse(spiffeID)
	if err != nil || u.Scheme != "spiffe" {
		return ""
	}
	return u.Host
}

// envoySidecarTLS is a sidecar's inbound TLS as Istio builds it for STRICT mTLS: the workload's
// certificate, a client certificate required and validated against the mesh root only (the
// client must send its intermediate), a URI SAN in the trust domain, TLS 1.2 to 1.3.
func envoySidecarTLS(o SidecarOptions, certs sidecarFiles) *core.TransportSocket {
	alpn := []string{"h2", "http/1.1"}
	if o.Protocol == TCP {
		alpn = []string{"istio-peer-exchange", "h2", "http/1.1"}
	}
	file := func(p string) *core.DataSource {
		return &core.DataSource{Specifier: &core.DataSource_Filename{Filename: p}}
	}
	ctx := &tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams: &tlsv3.TlsParameters{
				TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2,
				TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3,
			},
			TlsCertificates: []*tlsv3.TlsCertificate{{CertificateChain: file(certs.chain), PrivateKey: file(certs.key)}},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: file(certs.root),
				MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
					SanType: tlsv3.SubjectAltNameMatcher_URI,
					Matcher: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://" + trustDomain(o.SPIFFEID) + "/"}},
				}},
			}},
			AlpnProtocols: alpn,
		},
	}
	n, a := typed("envoy.transport_sockets.tls", ctx)
	return &core.TransportSocket{Name: n, ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: a}}
}

// callerPolicy is an AuthorizationPolicy allowing only callers, as istiod translates one to RBAC:
// principals authenticated by the peer certificate's URI SAN.
func callerPolicy(callers []string) *rbacv3.RBAC {
	var principals []*rbacv3.Principal
	for _, c := range callers {
		principals = append(principals, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{
			Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: c}}},
		}})
	}
	return &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{"allowed-callers": {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
		Principals:  principals,
	}}}
}

// envoySidecarFilters are a sidecar port's network filters toward the application cluster app.
//
// HTTP: an HTTP connection manager that detects HTTP/1.1 or HTTP/2 from the bytes (istio-http/1.1
// and istio-h2 negotiate no ALPN), sets x-forwarded-client-cert with the caller's URI as Istio's
// inbound does (APPEND_FORWARD; subject, DNS and URI), and adds the connection's TLS facts as
// request headers for the application's report.
//
// TCP: a tcp_proxy. Its application sees no TLS, so the facts travel in tunneling_config: the
// upstream is opened with an HTTP/1.1 CONNECT whose headers_to_add are substitution formatters
// evaluated against the downstream connection, and net/http reads them. (PROXY protocol v2 TLVs
// with format_string, tcp_proxy's proxy_protocol_tlvs, would carry them too, at the cost of a
// binary header parser in the application.) By default tcp_proxy connects upstream as soon as the
// connection is accepted, before the client's certificate has arrived, so the peer's URI SAN and
// serial would be empty: upstream_connect_mode ON_DOWNSTREAM_TLS_HANDSHAKE waits for the
// handshake, which is also what keeps a client whose chain fails away from the application.
func envoySidecarFilters(o SidecarOptions, app string) []*listener.Filter {
	if o.Protocol == TCP {
		return []*listener.Filter{networkFilter("envoy.filters.network.tcp_proxy", &tcpproxy.TcpProxy{
			StatPrefix:          o.Name,
			ClusterSpecifier:    &tcpproxy.TcpProxy_Cluster{Cluster: app},
			TunnelingConfig:     &tcpproxy.TcpProxy_TunnelingConfig{Hostname: o.Name + ".meshtest:1", HeadersToAdd: factHeaders(false)},
			UpstreamConnectMode: tcpproxy.UpstreamConnectMode_ON_DOWNSTREAM_TLS_HANDSHAKE,
			MaxEarlyDataBytes:   wrapperspb.UInt32(64 << 10),
		})}
	}
	var httpFilters []*hcm.HttpFilter
	if len(o.AllowedCallers) > 0 {
		n, a := typed("envoy.filters.http.rbac", &rbachttp.RBAC{Rules: callerPolicy(o.AllowedCallers)})
		httpFilters = append(httpFilters, &hcm.HttpFilter{Name: n, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: a}})
	}
	n, a := typed("envoy.filters.http.router", &router.Router{})
	httpFilters = append(httpFilters, &hcm.HttpFilter{Name: n, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: a}})
	return []*listener.Filter{networkFilter("envoy.filters.network.http_connection_manager", &hcm.HttpConnectionManager{
		StatPrefix:               o.Name,
		CodecType:                hcm.HttpConnectionManager_AUTO,
		ForwardClientCertDetails: hcm.HttpConnectionManager_APPEND_FORWARD,
		SetCurrentClientCertDetails: &hcm.HttpConnectionManager_SetCurrentClientCertDetails{
			Subject: wrapperspb.Bool(true), Dns: true, Uri: true,
		},
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: o.Name,
			VirtualHosts: []*route.VirtualHost{{
				Name:    o.Name,
				Domains: []string{"*"},
				Routes: []*route.Route{{
					Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
					// Istio's inbound routes have no timeout (0s), so Envoy adds no
					// x-envoy-expected-rq-timeout-ms toward the application.
					Action:              &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: app}, Timeout: durationpb.New(0)}},
					RequestHeadersToAdd: factHeaders(true),
				}},
			}},
		}},
		HttpFilters: httpFilters,
	})}
}

// envoySidecarListener is one sidecar port. Istio's STRICT inbound chain for a port matches
// transport_protocol tls and no ALPN; here that chain is repeated once per name in
// envoyChainALPN, each copy matching that ALPN and named after it, before the catch-all copy.
// Every copy accepts and refuses exactly what the single chain would (Envoy picks the first
// protocol of the client's list that a chain names, else the catch-all), but the chosen chain's
// name (%FILTER_CHAIN_NAME%) tells the application which ALPN the client offered: Envoy has no
// formatter for the ALPN list of a ClientHello, nor for the negotiated protocol, and
// istio-http/1.1 or istio-h2 negotiate none anyway.
func envoySidecarListener(o SidecarOptions, certs sidecarFiles, app string) (*listener.Listener, error) {
	la, err := socketAddress(o.Addr)
	if err != nil {
		return nil, fmt.Errorf("sidecar %s: %w", o.Name, err)
	}
	l := &listener.Listener{
		Name:            o.Name,
		StatPrefix:      o.Name,
		Address:         la,
		ListenerFilters: []*listener.ListenerFilter{tlsInspector()},
	}
	chain := func(name string, alpn []string) *listener.FilterChain {
		return &listener.FilterChain{
			Name:             name,
			FilterChainMatch: &listener.FilterChainMatch{TransportProtocol: "tls", ApplicationProtocols: alpn},
			TransportSocket:  envoySidecarTLS(o, certs),
			Filters:          envoySidecarFilters(o, app),
		}
	}
	for _, p := range envoyChainALPN {
		l.FilterChains = append(l.FilterChains, chain(p, []string{p}))
	}
	l.FilterChains = append(l.FilterChains, chain(noALPNChain, nil))
	return l, nil
}

type sidecarFiles struct{ chain, key, root string }

// EnvoySidecars is one Envoy playing several sidecars, each a listener in front of its own Go
// application that answers with a Report built from what Envoy told it.
type EnvoySidecars struct {
	*Process
	apps map[string]*envoyApp
}

// StartEnvoySidecars runs one Envoy with a STRICT mTLS inbound listener per option on its o.Addr
// (required) and a local application behind each (see envoySidecarListener, envoySidecarFilters).
// AllowedCallers become an HTTP RBAC filter, as istiod translates an AuthorizationPolicy: HTTP
// 403. A TCP sidecar takes none: Envoy's network RBAC filter decides on the caller's first bytes,
// and the application here speaks first (its report line), so a refused caller would read it.
func StartEnvoySidecars(dir string, opts ...SidecarOptions) (_ *EnvoySidecars, err error) {
	if len(opts) == 0 {
		return nil, errors.New("meshtest: no sidecars")
	}
	s := &EnvoySidecars{apps: map[string]*envoyApp{}}
	defer func() {
		if err != nil {
			s.stopApps()
		}
	}()
	admin, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	var listeners []*listener.Listener
	var clusters []*cluster.Cluster
	for _, o := range opts {
		if o.Addr == "" || o.CA == nil || o.Name == "" || (o.Protocol != HTTP && o.Protocol != TCP && o.Protocol != GRPC) {
			return nil, errors.New("meshtest: an Envoy sidecar needs a Name, Addr, CA and an http, tcp or grpc Protocol")
		}
		if o.Protocol == TCP && len(o.AllowedCallers) > 0 {
			return nil, fmt.Errorf("meshtest: Envoy TCP sidecar %s: AllowedCallers are HTTP only", o.Name)
		}
		if trustDomain(o.SPIFFEID) == "" {
			return nil, fmt.Errorf("meshtest: sidecar %s: %q is not a SPIFFE ID", o.Name, o.SPIFFEID)
		}
		if s.apps[o.Name] != nil {
			return nil, fmt.Errorf("meshtest: two sidecars named %s", o.Name)
		}
		name := "envoy-sidecar-" + o.Name
		if err := writeIdentity(dir, name, o.CA, o.SPIFFEID); err != nil {
			return nil, err
		}
		files := sidecarFiles{filepath.Join(dir, name+"-chain.pem"), filepath.Join(dir, name+"-key.pem"), filepath.Join(dir, name+"-root.pem")}
		if err := os.WriteFile(files.root, o.CA.RootPEM, 0o644); err != nil {
			return nil, err
		}
		app, err := startEnvoyApp(o.Name, o.Protocol)
		if err != nil {
			return nil, err
		}
		s.apps[o.Name] = app
		appCluster := "app-" + o.Name
		l, err := envoySidecarListener(o, files, appCluster)
		if err != nil {
			return nil, err
		}
		c, err := staticCluster(appCluster, app.ln.Addr().String())
		if err != nil {
			return nil, err
		}
		if o.Protocol == GRPC {
			n, a := typed("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", &upstreamhttp.HttpProtocolOptions{
				UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
					ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
				}},
			})
			c.TypedExtensionProtocolOptions = map[string]*anypb.Any{n: a}
		}
		listeners = append(listeners, l)
		clusters = append(clusters, c)
	}
	b, err := envoyBootstrap(admin, listeners, clusters)
	if err != nil {
		return nil, err
	}
	if s.Process, err = envoyProcess("envoy-sidecars-"+strings.ReplaceAll(opts[0].Addr, ":", "-"), dir, opts[0].Addr, admin, b); err != nil {
		return nil, err
	}
	return s, nil
}

// Stop stops Envoy, then the applications.
func (s *EnvoySidecars) Stop() error {
	err := s.Process.Stop()
	s.stopApps()
	return err
}

func (s *EnvoySidecars) stopApps() {
	for _, a := range s.apps {
		a.close()
	}
}

// Stats are sidecar name's counters: Handshakes and Rejected from its listener's stats
// (ssl.handshake; the failed handshakes, each counted once in ssl.fail_verify_no_cert,
// ssl.fail_verify_error (no chain to the root), ssl.fail_verify_san (outside the trust domain) or
// ssl.connection_error (any other failure, e.g. the client refusing the sidecar's certificate),
// plus the connections that matched no chain because they were not TLS), Served by its
// application, Denied by its RBAC filter.
func (s *EnvoySidecars) Stats(name string) (SidecarStats, error) {
	app := s.apps[name]
	if app == nil {
		return SidecarStats{}, fmt.Errorf("no sidecar %s", name)
	}
	st, err := EnvoyStats(s.Admin)
	if err != nil {
		return SidecarStats{}, err
	}
	l := "listener." + name + "."
	return SidecarStats{
		Handshakes: st[l+"ssl.handshake"],
		Rejected: st[l+"ssl.connection_error"] + st[l+"ssl.fail_verify_no_cert"] + st[l+"ssl.fail_verify_error"] +
			st[l+"ssl.fail_verify_san"] + st[l+"no_filter_chain_match"],
		Served: app.served.Load() + app.echoServed(),
		Denied: st["http."+name+".rbac.denied"],
	}, nil
}

// envoyApp is the application behind an Envoy sidecar: HTTP answers every request with a Report
// line; TCP accepts the CONNECT tcp_proxy tunnels the caller's stream in, writes a Report line
// into the tunnel and echoes.
type envoyApp struct {
	name, proto string
	ln          net.Listener
	srv         *http.Server
	echo        *EchoServer // a GRPC sidecar's application, instead of srv
	served      atomic.Int64
	mu          sync.Mutex
	tunnels     map[net.Conn]struct{}
}

func startEnvoyApp(name, proto string) (*envoyApp, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	a := &envoyApp{name: name, proto: proto, ln: ln, tunnels: map[net.Conn]struct{}{}}
	if proto == GRPC {
		if a.echo, err = NewEchoServer(); err != nil {
			ln.Close()
			return nil, err
		}
		go func() { _ = a.echo.Serve(ln) }()
		return a, nil
	}
	h := a.serveHTTP
	if proto == TCP {
		h = a.serveTunnel
	}
	a.srv = &http.Server{Handler: http.HandlerFunc(h), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = a.srv.Serve(ln) }()
	return a, nil
}

func (a *envoyApp) echoServed() int64 {
	if a.echo == nil {
		return 0
	}
	return a.echo.Served()
}

func (a *envoyApp) close() {
	if a.echo != nil {
		a.echo.Stop()
		return
	}
	_ = a.srv.Close()
	a.mu.Lock()
	for c := range a.tunnels {
		c.Close()
	}
	a.mu.Unlock()
}

// envoyReport is the Report line of what the sidecar's Envoy told the application, with the
// caller's identity from caller.
//
// verify=SUCCESS when Envoy names a peer certificate: the listener requires one and validates it
// against the mesh root and the trust domain (no ACCEPT_UNTRUSTED), so a connection with a peer
// certificate is one whose chain Envoy verified. alpn is the first protocol of the client's ALPN
// list that the sidecar has a chain for (envoySidecarListener), "-" if none.
func envoyReport(service, caller string, h http.Header) string {
	v := func(k string) string {
		if s := h.Get(k); s != "" {
			return s
		}
		return "-"
	}
	verify := "NONE"
	if h.Get("x-meshtest-serial") != "" && h.Get("x-meshtest-peer-uri") != "" {
		verify = "SUCCESS"
	}
	if caller == "" {
		caller = "-"
	}
	return fmt.Sprintf("service=%s verify=%s caller=%s serial=%s sni=%s alpn=%s tls=%s",
		service, verify, caller, v("x-meshtest-serial"), v("x-meshtest-sni"), v("x-meshtest-alpn"), v("x-meshtest-tls"))
}

func (a *envoyApp) serveHTTP(w http.ResponseWriter, r *http.Request) {
	a.served.Add(1)
	_, _ = io.Copy(io.Discard, r.Body)
	// The caller is who Envoy says in the x-forwarded-client-cert element it appended.
	caller := lastXFCCURI(r.Header.Values("X-Forwarded-Client-Cert"))
	proto := r.Header.Get("x-meshtest-proto")
	if proto == "HTTP/2" {
		proto = "HTTP/2.0" // Go's and HAProxy's spelling, as the other stand-ins report it
	}
	// What the application received, less the facts this stand-in's Envoy adds for the report.
	app := r.Header.Clone()
	for k := range app {
		if strings.HasPrefix(strings.ToLower(k), "x-meshtest-") {
			delete(app, k)
		}
	}
	// Upstream Envoy has no peer_metadata filter: the application does its part.
	peer := inboundPeerMetadata(a.name, app, w.Header())
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "%s host=%s proto=%s method=%s path=%s %s %s\n", envoyReport(a.name, caller, r.Header), r.Host, proto, r.Method, r.URL.Path, peer, headerReport(app))
}

func (a *envoyApp) serveTunnel(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
		return
	}
	c, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	a.mu.Lock()
	a.tunnels[c] = struct{}{}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.tunnels, c)
		a.mu.Unlock()
		c.Close()
	}()
	a.served.Add(1)
	_ = c.SetDeadline(time.Time{})
	if _, err := rw.WriteString("HTTP/1.1 200 OK\r\n\r\n"); err != nil {
		return
	}
	// Upstream Envoy has no istio.metadata_exchange filter: its header is written here, behind
	// Envoy, ahead of the application's bytes, when the chain the client's ALPN chose is
	// istio-peer-exchange (the TCP chains' server ALPN puts it first, so it is what Envoy
	// negotiates whenever the client offers it first among the names the sidecar has chains for).
	if r.Header.Get("x-meshtest-alpn") == PeerExchangeALPN {
		hdr, err := PeerExchangeHeader(sidecarMetadata(a.name))
		if err != nil {
			return
		}
		if _, err := rw.Write(hdr); err != nil {
			return
		}
	}
	if _, err := rw.WriteString(envoyReport(a.name, r.Header.Get("x-meshtest-peer-uri"), r.Header) + "\n"); err != nil {
		return
	}
	if err := rw.Flush(); err != nil {
		return
	}
	_, _ = io.Copy(c, rw.Reader)
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
		_, _ = io.Copy(io.Discard, c) // until Envoy closes the tunnel
	}
}

// lastXFCCURI is the URI of the last x-forwarded-client-cert element: the one the nearest proxy
// (this sidecar) appended.
func lastXFCCURI(values []string) string {
	elems, err := ParseXFCC(strings.Join(values, ","))
	if err != nil || len(elems) == 0 || len(elems[len(elems)-1]["URI"]) == 0 {
		return ""
	}
	return elems[len(elems)-1]["URI"][0]
}

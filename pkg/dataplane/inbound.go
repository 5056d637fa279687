package dataplane

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// The reverse direction's inbound listener, as Envoy serves it (pkg/controlplane/inbound.go):
// the tls_inspector listener filter, one filter chain per VM service port matched by the SNI
// (server_names, transport_protocol tls), downstream TLS with the fleet's certificate and a
// client certificate verified against the mesh root, then the caller's principal checked by
// RBAC and the call proxied in plain HTTP (XFCC set) or TCP. Unlike Envoy, whose network RBAC
// decides on the caller's first bytes after tcp_proxy has connected, the built-in data plane
// decides on a TCP caller right after the handshake, before any VM is dialled: a refused caller
// never reads a server-first VM's greeting.

var (
	nameTLSInspector = fullName(&tlsinspector.TlsInspector{})
	nameDownstreamTL = fullName(&tlsv3.DownstreamTlsContext{})
)

const hdrXFCCName = "X-Forwarded-Client-Cert"

// inboundConfig is the inbound listener's chains by SNI.
type inboundConfig struct {
	chains map[string]*inboundChain
}

// inboundChain is one VM service port.
type inboundChain struct {
	name    string
	service string // HOST:PORT, for metrics and logs
	tls     *tlsSpec
	require bool // require_client_certificate
	// rbac is the TCP chain's network RBAC; HTTP chains decide in their HCM's RBAC filter.
	rbac *rbacEngine
	// cfg serves the chain's connections: tcp or http set, as a plain listener's.
	cfg *listenerConfig
	// xfcc is set_current_client_cert_details (SANITIZE_SET chains).
	xfcc *hcm.HttpConnectionManager_SetCurrentClientCertDetails
	logs []*accessLogger
}

// inboundConn is a handshaken connection on a chain.
type inboundConn struct {
	chain *inboundChain
	peer  peerID
	// label is the caller's principal for metrics, "other" when the chain does not allow it
	// (so refused callers cannot grow the label set).
	label string
	xfcc  string // the value set on every request, "" when the chain sets none
	sni   string
}

type inboundKey struct{}

// isInbound reports whether l is an inbound (downstream TLS) listener.
func isInbound(l *listener.Listener) bool {
	fs := l.GetListenerFilters()
	if len(fs) != 1 || fs[0].GetTypedConfig() == nil {
		return false
	}
	return protoreflect.FullName(fs[0].GetTypedConfig().MessageName()) == nameTLSInspector
}

func (dp *DataPlane) parseInbound(l *listener.Listener, cfg *listenerConfig) (*listenerConfig, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("listener %q: %s", cfg.name, fmt.Sprintf(format, args...))
	}
	if l.GetDefaultFilterChain() != nil || len(l.GetAdditionalAddresses()) > 0 {
		return nil, fail("default_filter_chain and additional_addresses are not supported on a TLS listener")
	}
	if len(l.GetFilterChains()) == 0 {
		return nil, fail("filter_chains: empty")
	}
	ib := &inboundConfig{chains: map[string]*inboundChain{}}
	for i, fc := range l.GetFilterChains() {
		f := fmt.Sprintf("filter_chains[%d]", i)
		m := fc.GetFilterChainMatch()
		rest := &listener.FilterChainMatch{} // what m sets besides server names and tls
		if m != nil {
			rest = proto.Clone(m).(*listener.FilterChainMatch)
			rest.ServerNames, rest.TransportProtocol = nil, ""
		}
		if m == nil || len(m.GetServerNames()) == 0 || m.GetTransportProtocol() != "tls" || !proto.Equal(rest, &listener.FilterChainMatch{}) {
			return nil, fail("%s.filter_chain_match: a TLS listener's chains match server_names and transport_protocol tls, nothing else", f)
		}
		ch := &inboundChain{name: fc.GetName(), service: serviceOfSNI(m.GetServerNames()[0])}
		ts := fc.GetTransportSocket()
		if ts == nil {
			return nil, fail("%s.transport_socket: a DownstreamTlsContext is required", f)
		}
		tm, err := unpack(ts.GetTypedConfig(), f+".transport_socket")
		if err != nil {
			return nil, fail("%v", err)
		}
		if fullName(tm) != nameDownstreamTL {
			return nil, fail("%s.transport_socket: %s is not supported; only %s", f, fullName(tm), nameDownstreamTL)
		}
		dtc := tm.(*tlsv3.DownstreamTlsContext)
		if dtc.GetRequireSni().GetValue() || dtc.GetOcspStaplePolicy() != 0 || dtc.GetSessionTicketKeys() != nil || dtc.GetSessionTicketKeysSdsSecretConfig() != nil {
			return nil, fail("%s.transport_socket: only common_tls_context and require_client_certificate are supported", f)
		}
		spec, err := parseUpstreamTLS(&tlsv3.UpstreamTlsContext{CommonTlsContext: dtc.GetCommonTlsContext()})
		if err != nil {
			return nil, fail("%s.transport_socket: %v", f, err)
		}
		if spec.certSecret == "" {
			return nil, fail("%s.transport_socket: a server certificate is required", f)
		}
		ch.tls, ch.require = spec, dtc.GetRequireClientCertificate().GetValue()
		chainCfg := &listenerConfig{name: cfg.name, addr: cfg.addr, proto: l}
		filters := fc.GetFilters()
		for j, flt := range filters {
			ff := fmt.Sprintf("%s.filters[%d] (%s)", f, j, flt.GetName())
			fm, err := unpack(flt.GetTypedConfig(), ff)
			if err != nil {
				return nil, fail("%v", err)
			}
			last := j == len(filters)-1
			switch fullName(fm) {
			case nameNetRBAC:
				r := fm.(*rbacnet.RBAC)
				if last || ch.rbac != nil || r.GetMatcher() != nil || r.GetShadowMatcher() != nil {
					return nil, fail("%s: one rules-based network RBAC filter, before tcp_proxy", ff)
				}
				eng, err := parseRBAC(r.GetRules(), ff+".rules")
				if err != nil {
					return nil, fail("%v", err)
				}
				if eng == nil {
					eng = &rbacEngine{deny: true}
				}
				ch.rbac = eng
			case nameTCPProxy:
				if !last {
					return nil, fail("%s: tcp_proxy must be last", ff)
				}
				tp := proto.Clone(fm).(*tcpproxy.TcpProxy)
				ch.logs = dp.inboundLogs(tp.AccessLog)
				tp.AccessLog = nil // written by the inbound side, with the caller's principal
				tc, err := dp.parseTCPProxy(tp, ff)
				if err != nil {
					return nil, fail("%v", err)
				}
				chainCfg.tcp = tc
			case nameHCM:
				if !last {
					return nil, fail("%s: http_connection_manager must be last", ff)
				}
				h := proto.Clone(fm).(*hcm.HttpConnectionManager)
				ch.logs = dp.inboundLogs(h.AccessLog)
				h.AccessLog = nil
				if _, ok := h.GetRouteSpecifier().(*hcm.HttpConnectionManager_RouteConfig); !ok {
					return nil, fail("%s: an inline route_config is required on a TLS listener's chain", ff)
				}
				hc, err := dp.parseHCM(h, ff)
				if err != nil {
					return nil, fail("%v", err)
				}
				if h.GetForwardClientCertDetails() == hcm.HttpConnectionManager_SANITIZE_SET {
					ch.xfcc = h.GetSetCurrentClientCertDetails()
				}
				chainCfg.http = hc
			default:
				return nil, fail("%s: network filter %s is not supported on a TLS listener; use rbac + tcp_proxy or http_connection_manager", ff, fullName(fm))
			}
		}
		if chainCfg.tcp == nil && chainCfg.http == nil {
			return nil, fail("%s.filters: a tcp_proxy or http_connection_manager is required", f)
		}
		ch.cfg = chainCfg
		for _, sni := range m.GetServerNames() {
			if strings.HasPrefix(sni, "*") {
				return nil, fail("%s.filter_chain_match.server_names: wildcards are not supported (%q)", f, sni)
			}
			if ib.chains[sni] != nil {
				return nil, fail("%s.filter_chain_match.server_names: %q is matched by two chains", f, sni)
			}
			ib.chains[sni] = ch
		}
	}
	cfg.inbound = ib
	return cfg, nil
}

// inboundLogs keeps a chain's stdout loggers; their format is the inbound one here.
func (dp *DataPlane) inboundLogs(logs []*accesslog.AccessLog) []*accessLogger {
	var out []*accessLogger
	for _, l := range logs {
		switch protoreflect.FullName(l.GetTypedConfig().MessageName()) {
		case nameStdout:
			out = append(out, dp.logStdout)
		}
	}
	return out
}

// serviceOfSNI turns outbound_.PORT_._.HOST into HOST:PORT (or returns the SNI unchanged).
func serviceOfSNI(sni string) string {
	rest, ok := strings.CutPrefix(sni, "outbound_.")
	if !ok {
		return sni
	}
	port, rest, ok := strings.Cut(rest, "_.")
	if !ok {
		return sni
	}
	_, host, ok := strings.Cut(rest, "_.")
	if !ok {
		return sni
	}
	return host + ":" + port
}

// secretNames lists the SDS secrets an inbound listener's chains need.
func (l *listenerConfig) secretNames() []string {
	if l.inbound == nil {
		return nil
	}
	var out []string
	for _, ch := range l.inbound.chains {
		for _, n := range []string{ch.tls.certSecret, ch.tls.rootsSecret} {
			if n != "" {
				out = append(out, n)
			}
		}
	}
	return out
}

var errNoChain = errors.New("no filter chain matches the SNI")

// inboundTLS is the server TLS of an inbound listener: the chain is chosen by the ClientHello's
// SNI, with its certificate and trust bundle of the moment (SDS rotates them under open
// listeners).
func (l *listenerRT) inboundTLS(cfg *listenerConfig) *tls.Config {
	return &tls.Config{GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		ch := cfg.inbound.chains[hello.ServerName]
		if ch == nil {
			return nil, errNoChain
		}
		cert, err := l.dp.clientCertificate(ch.tls)
		if err != nil {
			return nil, err
		}
		auth := tls.RequestClientCert
		if ch.require {
			auth = tls.RequireAnyClientCert
		}
		return &tls.Config{
			Certificates: []tls.Certificate{*cert},
			MinVersion:   ch.tls.minVersion,
			MaxVersion:   ch.tls.maxVersion,
			ClientAuth:   auth,
			NextProtos:   selectALPN(ch.tls.alpn, hello.SupportedProtos),
			// Verified against the trust bundle of the moment and the chain's SAN matchers.
			VerifyConnection: func(cs tls.ConnectionState) error {
				if len(cs.PeerCertificates) == 0 {
					return nil // only without require_client_certificate
				}
				if err := l.dp.verifyServer(ch.tls, cs); err != nil {
					return fmt.Errorf("client certificate: %s", strings.Replace(err.Error(), "server ", "", 1))
				}
				return nil
			},
		}, nil
	}}
}

// selectALPN is BoringSSL's server choice as Envoy makes it: the first of the server's
// protocols the client offers, or none at all (no ALPN, the handshake goes on) when there is no
// overlap; crypto/tls would refuse the handshake instead.
func selectALPN(server, client []string) []string {
	for _, s := range server {
		for _, c := range client {
			if s == c {
				return []string{s}
			}
		}
	}
	return nil
}

// serveInbound completes the handshake, then serves the chain the SNI chose.
func (l *listenerRT) serveInbound(tc *trackedConn, cfg *listenerConfig) {
	start := time.Now()
	tlsConn := tc.Conn.(*tls.Conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err := tlsConn.HandshakeContext(ctx)
	cancel()
	if err != nil {
		l.dp.metrics.tlsFailures.WithLabelValues(cfg.name).Inc()
		l.dp.log.Debug("inbound TLS handshake failed", "listener", cfg.name, "peer", tc.RemoteAddr().String(), "error", err)
		tc.Close()
		return
	}
	cs := tlsConn.ConnectionState()
	ch := cfg.inbound.chains[cs.ServerName]
	if ch == nil { // cannot happen: GetConfigForClient refused it
		tc.Close()
		return
	}
	ic := &inboundConn{chain: ch, peer: peerID{addr: peerAddr(tc)}, label: "other", sni: cs.ServerName}
	var leaf *x509.Certificate
	if len(cs.PeerCertificates) > 0 {
		leaf = cs.PeerCertificates[0]
		for _, u := range leaf.URIs {
			ic.peer.uris = append(ic.peer.uris, u.String())
		}
	}
	eng := ch.rbac
	if hc := ch.cfg.http; hc != nil && hc.rbac != nil {
		eng = hc.rbac.engine
	}
	allowed := eng.allowedPeer(ic.peer)
	if allowed && len(ic.peer.uris) > 0 {
		ic.label = ic.peer.uris[0]
	}
	if ch.xfcc != nil && leaf != nil {
		ic.xfcc = xfccValue(ch.xfcc, cs, l.dp.localURIs(ch.tls))
	}
	if ch.cfg.tcp != nil {
		result := "allowed"
		flags := "-"
		if !allowed {
			result, flags = "denied", "RBAC"
			l.dp.metrics.rbacDenied.WithLabelValues(cfg.name).Inc()
		}
		l.dp.metrics.reverseConns.WithLabelValues(ch.service, ic.label, result).Inc()
		if allowed {
			l.serveTCP(tc, ch.cfg)
		} else {
			tc.Close()
		}
		for _, lg := range ch.logs {
			lg.write(inboundLogLine(start, ic, "-", 0, flags, ch.cfg.tcp.cluster))
		}
		return
	}
	tc.inbound = ic
	l.handHTTP(tc)
}

// localURIs are the URI SANs of the chain's own certificate (XFCC's By).
func (dp *DataPlane) localURIs(spec *tlsSpec) []string {
	cert, err := dp.clientCertificate(spec)
	if err != nil || len(cert.Certificate) == 0 {
		return nil
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil
		}
	}
	out := make([]string, 0, len(leaf.URIs))
	for _, u := range leaf.URIs {
		out = append(out, u.String())
	}
	return out
}

// xfccValue is Envoy's x-forwarded-client-cert element for the connection's peer, in Envoy's
// order: By (our URI SANs), Hash (the peer leaf's SHA-256), Cert, Chain, Subject, URI, DNS.
func xfccValue(d *hcm.HttpConnectionManager_SetCurrentClientCertDetails, cs tls.ConnectionState, local []string) string {
	leaf := cs.PeerCertificates[0]
	var parts []string
	for _, u := range local {
		parts = append(parts, "By="+u)
	}
	sum := sha256.Sum256(leaf.Raw)
	parts = append(parts, "Hash="+hex.EncodeToString(sum[:]))
	if d.GetSubject().GetValue() {
		parts = append(parts, `Subject="`+leaf.Subject.String()+`"`)
	}
	if d.GetUri() {
		for _, u := range leaf.URIs {
			parts = append(parts, "URI="+u.String())
		}
	}
	if d.GetDns() {
		for _, n := range leaf.DNSNames {
			parts = append(parts, "DNS="+n)
		}
	}
	return strings.Join(parts, ";")
}

// inboundLogLine is the inbound access log line: the VM service (SNI) and the caller's
// principal besides Envoy's usual fields, as the control plane's InboundAccessLogFormat.
func inboundLogLine(start time.Time, ic *inboundConn, request string, code int, flags, cluster string) []byte {
	peer := "-"
	if len(ic.peer.uris) > 0 {
		peer = ic.peer.uris[0]
	}
	c := "0"
	if code > 0 {
		c = strconv.Itoa(code)
	}
	return fmt.Appendf(nil, "[%s] inbound %q peer=%q %q %s %s %d %q\n", start.UTC().Format("2006-01-02T15:04:05.000Z"),
		ic.sni, peer, request, c, flags, time.Since(start).Milliseconds(), cluster)
}

// inboundOf returns the inbound connection a request came on, if any.
func inboundOf(r *http.Request) *inboundConn {
	ic, _ := r.Context().Value(inboundKey{}).(*inboundConn)
	return ic
}

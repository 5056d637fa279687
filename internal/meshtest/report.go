package meshtest

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"net/url"
	"strings"
)

// Report is what a sidecar stand-in tells its caller about the connection, so tests can assert
// the identity, SNI and ALPN the caller used. Every stand-in (Go, HAProxy, nginx, Envoy) answers
// one line of space-separated key=value fields:
//
//	service  the stand-in's name
//	verify   the sidecar's client-chain verdict: SUCCESS (Go, nginx, Envoy) or 0 (HAProxy's
//	         ssl_c_verify)
//	caller   the caller's SPIFFE ID (Go; Envoy: x-forwarded-client-cert's URI for HTTP, the peer
//	         URI SAN for TCP), or derived from cert / certpem
//	cert     the caller's leaf, base64 DER (HAProxy's ssl_c_der,base64)
//	certpem  the caller's leaf, URL-escaped PEM (nginx's $ssl_client_escaped_cert)
//	serial   the caller leaf's serial number, hex
//	sni      the SNI the sidecar saw
//	alpn     the ALPN protocols: offered (Go, comma separated), negotiated (HAProxy, nginx), or
//	         the first offered one the listener has a filter chain for (Envoy)
//	tls      the TLS version (Envoy)
//	host, proto, method, path   for HTTP
//	xfcc     HTTP: the x-forwarded-client-cert the application sees, after the sidecar added its
//	         own entry (APPEND_FORWARD), query-escaped
//	requestid, external   HTTP: the x-request-id and x-envoy-external-address the application
//	         sees, query-escaped
//	headers  HTTP: the names of the request headers the application received, lower case,
//	         comma separated
//	peer     HTTP: the caller's workload, WORKLOAD_NAME.NAMESPACE, as Istio's inbound
//	         peer_metadata filter decodes x-envoy-peer-metadata (Go, Envoy); taken from
//	         peermetadata when absent (HAProxy cannot decode it)
//	peerid, peermetadata   HTTP: the x-envoy-peer-metadata-id and x-envoy-peer-metadata the
//	         sidecar received (and removed before the application), query-escaped
//
// An empty or "-" value is no value.
type Report struct {
	Fields   map[string]string
	Service  string
	Caller   string
	Serial   string
	SNI      string
	ALPN     []string
	Verified bool
	Host     string
	Proto    string
	// XFCC, RequestID and ExternalAddress are the unescaped xfcc, requestid and external fields.
	XFCC, RequestID, ExternalAddress string
	// Headers are the header names the application received.
	Headers []string
	// Peer is the caller's workload as Istio decodes its peer metadata (WORKLOAD_NAME.NAMESPACE),
	// PeerID and PeerMetadata what the sidecar received; empty and nil when none came.
	Peer, PeerID string
	PeerMetadata *PeerWorkload
}

// ParseReport parses a report line.
func ParseReport(line string) (Report, error) {
	r := Report{Fields: map[string]string{}}
	for _, f := range strings.Fields(line) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return r, fmt.Errorf("report field %q is not key=value in %q", f, line)
		}
		r.Fields[k] = v
	}
	if len(r.Fields) == 0 {
		return r, fmt.Errorf("empty report")
	}
	r.Service, r.Caller, r.SNI, r.Host, r.Proto = r.Fields["service"], r.Fields["caller"], r.Fields["sni"], r.Fields["host"], r.Fields["proto"]
	r.Serial = strings.ToLower(strings.TrimLeft(r.Fields["serial"], "0"))
	if a := r.Fields["alpn"]; a != "" && a != "-" {
		r.ALPN = strings.Split(a, ",")
	}
	if h := r.Fields["headers"]; h != "" && h != "-" {
		r.Headers = strings.Split(h, ",")
	}
	var peerMetadata string
	for k, dst := range map[string]*string{"xfcc": &r.XFCC, "requestid": &r.RequestID, "external": &r.ExternalAddress,
		"peerid": &r.PeerID, "peermetadata": &peerMetadata} {
		if v := r.Fields[k]; v != "" && v != "-" {
			u, err := url.QueryUnescape(v)
			if err != nil {
				return r, fmt.Errorf("report %s: %w", k, err)
			}
			*dst = u
		}
	}
	if peerMetadata != "" {
		p, err := DecodePeerMetadata(peerMetadata)
		if err != nil {
			return r, fmt.Errorf("report peermetadata: %w", err)
		}
		r.PeerMetadata = &p
	}
	switch p := r.Fields["peer"]; {
	case p != "" && p != "-":
		r.Peer = p
	case p == "" && r.PeerMetadata != nil:
		r.Peer = r.PeerMetadata.String()
	}
	switch r.Fields["verify"] {
	case "SUCCESS", "0":
		r.Verified = true
	}
	var der []byte
	if c := r.Fields["cert"]; c != "" && c != "-" {
		b, err := base64.StdEncoding.DecodeString(c)
		if err != nil {
			return r, fmt.Errorf("report cert: %w", err)
		}
		der = b
	}
	if c := r.Fields["certpem"]; c != "" && c != "-" {
		p, err := url.PathUnescape(c)
		if err != nil {
			return r, fmt.Errorf("report certpem: %w", err)
		}
		blk, _ := pem.Decode([]byte(p))
		if blk == nil {
			return r, fmt.Errorf("report certpem: no PEM block")
		}
		der = blk.Bytes
	}
	if der != nil {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return r, fmt.Errorf("report cert: %w", err)
		}
		if r.Caller == "" {
			r.Caller = SPIFFEID(cert)
		}
		if r.Serial == "" {
			r.Serial = cert.SerialNumber.Text(16)
		}
	}
	return r, nil
}

// SPIFFEID is the certificate's first spiffe:// URI SAN, "" if none.
func SPIFFEID(c *x509.Certificate) string {
	for _, u := range c.URIs {
		if u.Scheme == "spiffe" {
			return u.String()
		}
	}
	return ""
}

// XFCCElement is one element of an x-forwarded-client-cert header: its keys (By, Hash, Cert,
// Chain, Subject, URI, DNS) with their values, unquoted, in order; a key can repeat.
type XFCCElement map[string][]string

// ParseXFCC splits an x-forwarded-client-cert value into its elements (separated by commas) of
// key=value pairs (separated by semicolons); a double-quoted value may hold either separator.
func ParseXFCC(v string) ([]XFCCElement, error) {
	var out []XFCCElement
	if v == "" {
		return nil, nil
	}
	for _, elem := range splitQuoted(v, ',') {
		e := XFCCElement{}
		for _, pair := range splitQuoted(elem, ';') {
			k, val, ok := strings.Cut(pair, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("XFCC %q: %q is not key=value", v, pair)
			}
			if len(val) >= 2 && val[0] == '"' && val[len(val)-1] == '"' {
				val = strings.ReplaceAll(val[1:len(val)-1], `\"`, `"`)
			}
			e[k] = append(e[k], val)
		}
		out = append(out, e)
	}
	return out, nil
}

// splitQuoted splits s at sep outside double quotes (a backslash escapes a quote).
func splitQuoted(s string, sep byte) []string {
	var parts []string
	quoted, start := false, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && quoted:
			i++
		case s[i] == '"':
			quoted = !quoted
		case s[i] == sep && !quoted:
			parts = append(parts, strings.TrimSpace(s[start:i]))
			start = i + 1
		}
	}
	return append(parts, strings.TrimSpace(s[start:]))
}

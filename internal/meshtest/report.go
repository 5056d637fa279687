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

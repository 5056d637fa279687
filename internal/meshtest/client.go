package meshtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"time"
)

// ClientTLS is the TLS configuration an Istio client uses toward target t: its leaf and
// intermediate, the mesh root, the Istio SNI and ALPN, and a check that the server presents
// serverID as its URI SAN. A nil leaf sends no client certificate.
func ClientTLS(leaf *Leaf, ca *CA, t Target, alpn []string, serverID string) (*tls.Config, error) {
	roots := x509.NewCertPool()
	roots.AddCert(ca.Root)
	conf := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: t.SNI(),
		NextProtos: alpn,
		RootCAs:    roots,
		// The server is identified by its SPIFFE ID, not by a DNS name: verify the chain here.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return err
			}
			if got := SPIFFEID(cs.PeerCertificates[0]); got != serverID {
				return fmt.Errorf("server identity %q, want %q", got, serverID)
			}
			return nil
		},
	}
	if leaf != nil {
		cert, err := tls.X509KeyPair(leaf.ChainPEM, leaf.KeyPEM)
		if err != nil {
			return nil, err
		}
		// Sent whatever the server's CertificateRequest lists as acceptable CAs: crypto/tls would
		// otherwise send none for a chain that does not name the listed root (a leaf without its
		// intermediate, another CA's), and a stand-in would only be refusing a client without a
		// certificate.
		conf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return conf, nil
}

// DialMesh opens an Istio mTLS connection to t through the gateway at addr.
func DialMesh(ctx context.Context, addr string, conf *tls.Config) (*tls.Conn, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: conf}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return c.(*tls.Conn), nil
}

// MeshHTTPClient is an HTTP client that reaches every request's service through the gateway at
// addr over Istio mTLS with conf: HTTP/1.1, or HTTP/2 with prior knowledge when h2 is set (as an
// Istio client does on istio-h2). Use http:// URLs; TLS is below the client's view.
func MeshHTTPClient(addr string, conf *tls.Config, h2 bool) *http.Client {
	var protos http.Protocols
	if h2 {
		protos.SetUnencryptedHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Protocols: &protos,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				c, err := DialMesh(ctx, addr, conf)
				if err != nil {
					return nil, err
				}
				return plainConn{c}, nil
			},
		},
	}
}

// plainConn hides the *tls.Conn from net/http so it speaks the negotiated-nothing protocol it is
// told to (HTTP/1.1 or HTTP/2 with prior knowledge) over it.
type plainConn struct{ net.Conn }

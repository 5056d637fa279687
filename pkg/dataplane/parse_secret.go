package dataplane

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

type secret struct {
	name  string
	cert  *tls.Certificate // TLS certificate secrets
	roots *x509.CertPool   // validation context secrets
}

func parseSecret(s *tlsv3.Secret) (*secret, error) {
	name := s.GetName()
	if name == "" {
		return nil, errors.New("secret without a name")
	}
	out := &secret{name: name}
	switch t := s.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		c, err := parseTLSCertificate(t.TlsCertificate)
		if err != nil {
			return nil, fmt.Errorf("secret %q: tls_certificate: %v", name, err)
		}
		out.cert = c
	case *tlsv3.Secret_ValidationContext:
		vc := t.ValidationContext
		if len(vc.GetMatchTypedSubjectAltNames()) > 0 || len(vc.GetVerifyCertificateSpki()) > 0 || len(vc.GetVerifyCertificateHash()) > 0 || vc.GetCrl() != nil {
			return nil, fmt.Errorf("secret %q: validation_context: only trusted_ca is supported in a secret", name)
		}
		pem, err := readDataSource(vc.GetTrustedCa())
		if err != nil {
			return nil, fmt.Errorf("secret %q: validation_context.trusted_ca: %v", name, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("secret %q: validation_context.trusted_ca: no PEM certificate found", name)
		}
		out.roots = pool
	default:
		return nil, fmt.Errorf("secret %q: type %T is not supported; use tls_certificate or validation_context", name, s.GetType())
	}
	return out, nil
}

// parseTLSCertificate loads a chain and key. Errors never quote the key material.
func parseTLSCertificate(tc *tlsv3.TlsCertificate) (*tls.Certificate, error) {
	chain, err := readDataSource(tc.GetCertificateChain())
	if err != nil {
		return nil, fmt.Errorf("certificate_chain: %v", err)
	}
	key, err := readDataSource(tc.GetPrivateKey())
	if err != nil {
		return nil, errors.New("private_key: cannot be read")
	}
	if tc.GetPrivateKeyProvider() != nil || tc.GetPassword() != nil || tc.GetPkcs12() != nil {
		return nil, errors.New("private key providers, passwords and PKCS#12 are not supported")
	}
	c, err := tls.X509KeyPair(chain, key)
	if err != nil {
		return nil, errors.New("certificate_chain and private_key do not form a valid key pair (PEM leaf + intermediates, matching PKCS#8/PKCS#1/EC key)")
	}
	return &c, nil
}

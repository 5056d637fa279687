// Package meshtest provides stand-ins for the mesh side in tests: a CA hierarchy shaped like
// Istio's, and (elsewhere in this package) gateways and sidecars.
package meshtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
)

// CA is a root and an intermediate ("Istio CA") that signs workload leaves the way Istio does:
// empty subject, a critical URI SAN, short lifetime.
type CA struct {
	Root, Intermediate       *x509.Certificate
	rootKey, intermediateKey *ecdsa.PrivateKey
	RootPEM, IntermediatePEM []byte
}

var serial atomic.Int64

func nextSerial() *big.Int { return big.NewInt(time.Now().UnixNano() + serial.Add(1)) }

// NewCA makes a root and an intermediate valid from an hour ago for ten years.
func NewCA(org string) (*CA, error) {
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{Organization: []string{org}, CommonName: "Root CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	root, _ := x509.ParseCertificate(rootDER)
	intKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	intTmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{Organization: []string{org}, CommonName: "Istio CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(5 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	intDER, err := x509.CreateCertificate(rand.Reader, intTmpl, root, &intKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	inter, _ := x509.ParseCertificate(intDER)
	return &CA{
		Root: root, Intermediate: inter, rootKey: rootKey, intermediateKey: intKey,
		RootPEM:         pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootDER}),
		IntermediatePEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: intDER}),
	}, nil
}

// Leaf is an issued workload certificate.
type Leaf struct {
	ChainPEM []byte // leaf + intermediate
	KeyPEM   []byte
	Cert     *x509.Certificate
}

// Issue signs a workload certificate for spiffeID valid from notBefore to notAfter.
func (ca *CA) Issue(spiffeID string, notBefore, notAfter time.Time) (*Leaf, error) {
	return ca.IssueWithDNS(spiffeID, nil, notBefore, notAfter)
}

// IssueWithDNS is Issue with DNS SANs besides the URI SAN, for TLS clients that can only check
// a DNS name (Istio does not issue these).
func (ca *CA) IssueWithDNS(spiffeID string, dnsNames []string, notBefore, notAfter time.Time) (*Leaf, error) {
	u, err := url.Parse(spiffeID)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), NotBefore: notBefore, NotAfter: notAfter,
		URIs:        []*url.URL{u}, // empty subject: Go marks the SAN extension critical, as Istio does
		DNSNames:    dnsNames,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Intermediate, &key.PublicKey, ca.intermediateKey)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	chain := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ca.IntermediatePEM...)
	return &Leaf{ChainPEM: chain, KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), Cert: cert}, nil
}

// IssueFor signs a workload certificate valid from a minute ago for ttl.
func (ca *CA) IssueFor(spiffeID string, ttl time.Duration) (*Leaf, error) {
	now := time.Now()
	return ca.Issue(spiffeID, now.Add(-time.Minute), now.Add(ttl))
}

// WriteFiles writes the leaf as cert-chain.pem, key.pem (0600) and root-cert.pem in dir, the
// names Istio's agent uses, replacing existing files atomically.
func (l *Leaf) WriteFiles(dir string, rootPEM []byte) (chain, key, root string, err error) {
	chain, key, root = filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root-cert.pem")
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{key, l.KeyPEM, 0o600}, {chain, l.ChainPEM, 0o644}, {root, rootPEM, 0o644}} {
		tmp := f.path + ".tmp"
		if err = os.WriteFile(tmp, f.data, f.mode); err != nil {
			return
		}
		if err = os.Rename(tmp, f.path); err != nil {
			return
		}
	}
	return
}

// Sign signs tmpl for pub with the intermediate, as a CA service signing a CSR would.
func (ca *CA) Sign(tmpl *x509.Certificate, pub any) (*x509.Certificate, error) {
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber = nextSerial()
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Intermediate, pub, ca.intermediateKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

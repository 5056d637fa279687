// Package identity holds the fleet's one mesh workload identity: a SPIFFE certificate chain, its
// private key and the mesh's root bundle, checked the way the mesh will check it.
package identity

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"
)

// Bundle is a verified identity. It is immutable; rotation produces a new Bundle.
type Bundle struct {
	SPIFFEID string
	// CertChainPEM is the leaf followed by its intermediates, as sent to peers.
	CertChainPEM []byte
	// KeyPEM is the private key. It never leaves the process except to the local data plane.
	KeyPEM []byte
	// RootsPEM is the mesh's trust bundle.
	RootsPEM []byte
	Leaf     *x509.Certificate
}

// NotAfter is when the leaf expires.
func (b *Bundle) NotAfter() time.Time { return b.Leaf.NotAfter }

// Expired reports whether the leaf is past its NotAfter at now.
func (b *Bundle) Expired(now time.Time) bool { return now.After(b.Leaf.NotAfter) }

// Fingerprint is the SHA-256 of the leaf certificate, safe to log and compare.
func (b *Bundle) Fingerprint() string {
	sum := sha256.Sum256(b.Leaf.Raw)
	return hex.EncodeToString(sum[:])
}

// String describes the bundle without any secret.
func (b *Bundle) String() string {
	return fmt.Sprintf("%s (serial %s, expires %s)", b.SPIFFEID, b.Leaf.SerialNumber, b.Leaf.NotAfter.UTC().Format(time.RFC3339))
}

// TLSCertificate is the chain and key for a Go TLS client.
func (b *Bundle) TLSCertificate() (tls.Certificate, error) {
	return tls.X509KeyPair(b.CertChainPEM, b.KeyPEM)
}

// RootPool is the trust bundle as a pool.
func (b *Bundle) RootPool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(b.RootsPEM)
	return pool
}

// ErrExpired marks an identity past its validity.
var ErrExpired = errors.New("identity certificate has expired")

// ErrNotYetValid marks an identity whose validity has not started: most often a clock behind
// the issuer's, which renewing would not fix.
var ErrNotYetValid = errors.New("identity certificate is not valid yet")

// LoadFiles reads and verifies an identity from PEM files.
func LoadFiles(spiffeID, chainPath, keyPath, rootsPath string, now time.Time) (*Bundle, error) {
	chain, err := os.ReadFile(chainPath)
	if err != nil {
		return nil, fmt.Errorf("identity.files.certChain: %w", err)
	}
	key, err := readPrivateKey(keyPath)
	if err != nil {
		return nil, fmt.Errorf("identity.files.privateKey: %w", err)
	}
	roots, err := os.ReadFile(rootsPath)
	if err != nil {
		return nil, fmt.Errorf("identity.files.roots: %w", err)
	}
	return New(spiffeID, chain, key, roots, now)
}

// readPrivateKey reads a key file that only its owner may read: a key readable by group or
// others is refused rather than served, since whoever reads it can act as the fleet.
func readPrivateKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if runtime.GOOS != "windows" { // Windows has no such mode bits; its ACLs are another matter
		fi, err := f.Stat()
		if err != nil {
			return nil, err
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			return nil, fmt.Errorf("%s is mode %04o, readable by group or others; only the daemon may read the fleet's key: chmod 600 %s", path, perm, path)
		}
	}
	return io.ReadAll(f)
}

// New verifies an identity: the key matches the leaf, the leaf's URI SAN is spiffeID, and the
// chain (leaf + intermediates) verifies to the roots at now. It relies on no subject field, since
// mesh certificates have an empty subject and a critical URI SAN.
func New(spiffeID string, chainPEM, keyPEM, rootsPEM []byte, now time.Time) (*Bundle, error) {
	certs, err := parseCerts(chainPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate chain: %w", err)
	}
	if len(certs) == 0 {
		return nil, errors.New("certificate chain: no CERTIFICATE block found; the file must hold the leaf followed by its intermediates")
	}
	roots, err := parseCerts(rootsPEM)
	if err != nil {
		return nil, fmt.Errorf("roots: %w", err)
	}
	if len(roots) == 0 {
		return nil, errors.New("roots: no CERTIFICATE block found; the file must hold the mesh's root CA certificate(s)")
	}
	if _, err := tls.X509KeyPair(chainPEM, keyPEM); err != nil {
		return nil, fmt.Errorf("private key does not match the leaf certificate or cannot be parsed: %v", redact(err))
	}
	leaf := certs[0]
	found := false
	var uris []string
	for _, u := range leaf.URIs {
		uris = append(uris, u.String())
		if u.String() == spiffeID {
			found = true
		}
	}
	if !found {
		return nil, fmt.Errorf("leaf certificate's URI SANs %q do not include identity.spiffeID %q; issue the certificate for that ID or fix the config", uris, spiffeID)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, verr := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if verr != nil {
		var inv x509.CertificateInvalidError
		if errors.As(verr, &inv) && inv.Reason == x509.Expired {
			// x509 says "expired or is not yet valid" for both; they call for different fixes.
			which := "leaf certificate"
			if inv.Cert != nil && inv.Cert != leaf {
				which = fmt.Sprintf("CA certificate %q", inv.Cert.Subject.String())
			}
			if inv.Cert != nil && now.Before(inv.Cert.NotBefore) {
				return nil, fmt.Errorf("%w: the %s is not valid until %s (now %s); check this machine's clock (NTP) and the issuer's, or wait until then",
					ErrNotYetValid, which, inv.Cert.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
			}
			return nil, fmt.Errorf("%w (leaf valid %s to %s, now %s): renew it",
				ErrExpired, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
		return nil, fmt.Errorf("certificate chain does not verify to the root bundle: %v; the chain file must hold the leaf and its intermediate(s), the roots file the mesh's root CA", verr)
	}
	return &Bundle{SPIFFEID: spiffeID, CertChainPEM: chainPEM, KeyPEM: keyPEM, RootsPEM: rootsPEM, Leaf: leaf}, nil
}

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %v", len(out)+1, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// redact keeps key material out of error text; crypto errors carry none today, but say so here.
func redact(err error) string {
	msg := err.Error()
	if bytes.Contains([]byte(msg), []byte("PRIVATE KEY-----")) {
		return "invalid private key"
	}
	return msg
}

// Files is an identity kept in PEM files.
type Files struct {
	SPIFFEID                     string
	CertChain, PrivateKey, Roots string
}

// Load reads and verifies the files now.
func (f Files) Load() (*Bundle, error) {
	return LoadFiles(f.SPIFFEID, f.CertChain, f.PrivateKey, f.Roots, time.Now())
}

// Paths lists the files to watch.
func (f Files) Paths() []string { return []string{f.CertChain, f.PrivateKey, f.Roots} }

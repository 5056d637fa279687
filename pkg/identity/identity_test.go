package identity_test

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

const fleetID = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"

func newCA(t *testing.T) *meshtest.CA {
	t.Helper()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestLoadsIstioStyleCertificate(t *testing.T) {
	ca := newCA(t)
	leaf, err := ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// The shape Istio issues: empty subject, critical URI SAN.
	if len(leaf.Cert.Subject.Names) != 0 {
		t.Fatalf("test leaf has a subject: %v", leaf.Cert.Subject)
	}
	critical := false
	for _, e := range leaf.Cert.Extensions {
		if e.Id.String() == "2.5.29.17" {
			critical = e.Critical
		}
	}
	if !critical {
		t.Fatal("test leaf's SAN extension is not critical")
	}
	dir := t.TempDir()
	chain, key, root, err := leaf.WriteFiles(dir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(key); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	b, err := identity.Files{SPIFFEID: fleetID, CertChain: chain, PrivateKey: key, Roots: root}.Load()
	if err != nil {
		t.Fatalf("Istio-style identity rejected: %v", err)
	}
	if b.SPIFFEID != fleetID || !b.NotAfter().Equal(leaf.Cert.NotAfter) {
		t.Fatalf("bundle = %v", b)
	}
	if strings.Contains(b.String(), "PRIVATE") {
		t.Fatal("String() leaks the key")
	}
	if _, err := b.TLSCertificate(); err != nil {
		t.Fatal(err)
	}
}

func TestRejectsBadIdentities(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	good, err := ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	wrongSAN, err := ca.IssueFor("spiffe://cluster.local/ns/other/sa/x", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	expired, _ := ca.Issue(fleetID, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	notYet, _ := ca.Issue(fleetID, time.Now().Add(time.Hour), time.Now().Add(2*time.Hour))
	foreign, err := other.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leafOnly := firstPEM(good.ChainPEM)
	cases := []struct {
		name              string
		chain, key, roots []byte
		want              string
		is                error
	}{
		{"wrong SAN", wrongSAN.ChainPEM, wrongSAN.KeyPEM, ca.RootPEM, `do not include identity.spiffeID "` + fleetID + `"`, nil},
		{"expired", expired.ChainPEM, expired.KeyPEM, ca.RootPEM, "has expired", identity.ErrExpired},
		{"not yet valid", notYet.ChainPEM, notYet.KeyPEM, ca.RootPEM, "leaf certificate is not valid until " + notYet.Cert.NotBefore.UTC().Format(time.RFC3339), identity.ErrNotYetValid},
		{"other CA", foreign.ChainPEM, foreign.KeyPEM, ca.RootPEM, "does not verify to the root bundle", nil},
		{"missing intermediate", leafOnly, good.KeyPEM, ca.RootPEM, "does not verify to the root bundle", nil},
		{"key mismatch", good.ChainPEM, wrongSAN.KeyPEM, ca.RootPEM, "private key does not match", nil},
		{"empty chain", nil, good.KeyPEM, ca.RootPEM, "no CERTIFICATE block", nil},
		{"empty roots", good.ChainPEM, good.KeyPEM, nil, "roots: no CERTIFICATE block", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := identity.New(fleetID, tc.chain, tc.key, tc.roots, time.Now())
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if tc.is == identity.ErrNotYetValid && (errors.Is(err, identity.ErrExpired) || strings.Contains(err.Error(), "expired")) {
				t.Fatalf("a certificate that is not valid yet is reported as expired: %v", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("error %v is not %v", err, tc.is)
			}
			if strings.Contains(err.Error(), "PRIVATE KEY") {
				t.Fatal("error leaks key material")
			}
		})
	}
}

// TestKeyReadableByOthersIsRefused: the fleet's private key must be readable by the daemon only.
func TestKeyReadableByOthersIsRefused(t *testing.T) {
	ca := newCA(t)
	leaf, err := ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	chain, key, root, err := leaf.WriteFiles(dir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	files := identity.Files{SPIFFEID: fleetID, CertChain: chain, PrivateKey: key, Roots: root}
	for _, mode := range []os.FileMode{0o640, 0o604, 0o644} {
		if err := os.Chmod(key, mode); err != nil {
			t.Fatal(err)
		}
		_, err := files.Load()
		want := "identity.files.privateKey: " + key + " is mode " + fmt.Sprintf("%04o", mode) + ", readable by group or others; only the daemon may read the fleet's key: chmod 600 " + key
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("mode %v: err = %v, want %q", mode, err, want)
		}
	}
	for _, mode := range []os.FileMode{0o600, 0o400} {
		if err := os.Chmod(key, mode); err != nil {
			t.Fatal(err)
		}
		if _, err := files.Load(); err != nil {
			t.Fatalf("mode %v refused: %v", mode, err)
		}
	}
}

func TestMissingFileNamesField(t *testing.T) {
	dir := t.TempDir()
	_, err := identity.Files{SPIFFEID: fleetID, CertChain: filepath.Join(dir, "nope.pem")}.Load()
	if err == nil || !strings.Contains(err.Error(), "identity.files.certChain") {
		t.Fatalf("err = %v", err)
	}
}

func firstPEM(data []byte) []byte {
	b, _ := pem.Decode(data)
	if _, err := x509.ParseCertificate(b.Bytes); err != nil {
		panic(err)
	}
	return pem.EncodeToMemory(b)
}

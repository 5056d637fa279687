package identity

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

const (
	testCAARN   = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/11111111-2222-3333-4444-555555555555"
	testFleetID = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	passthrough = "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"
)

func newFakePCA(t *testing.T) (*meshtest.ACMPCA, *httptest.Server) {
	ca, err := meshtest.NewCA("test-mesh")
	if err != nil {
		t.Fatal(err)
	}
	f := meshtest.NewACMPCA(ca, testCAARN)
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv
}

func testClient(srv *httptest.Server) *acmpca.Client {
	return acmpca.New(acmpca.Options{
		Region:       "eu-west-1",
		BaseEndpoint: aws.String(srv.URL),
		Credentials:  credentials.NewStaticCredentialsProvider("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", ""),
		HTTPClient:   srv.Client(),
	})
}

func testIssuer(srv *httptest.Server) *ACMPCA {
	return &ACMPCA{
		Client: testClient(srv), CertificateAuthorityARN: testCAARN, SPIFFEID: testFleetID,
		SigningAlgorithm: "SHA256WITHECDSA", TemplateARN: passthrough, Validity: time.Hour,
		KeyAlgorithm: "ECDSA_P256", PollDelay: 10 * time.Millisecond, MaxWait: 10 * time.Second,
	}
}

func TestACMPCAIssue(t *testing.T) {
	f, srv := newFakePCA(t)
	ctx := context.Background()
	for _, alg := range []string{"ECDSA_P256", "RSA_2048"} {
		t.Run(alg, func(t *testing.T) {
			iss := testIssuer(srv)
			iss.KeyAlgorithm = alg
			before := time.Now()
			b, err := iss.Issue(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if b.SPIFFEID != testFleetID || len(b.Leaf.URIs) != 1 || b.Leaf.URIs[0].String() != testFleetID {
				t.Fatalf("leaf URIs %v", b.Leaf.URIs)
			}
			if got := b.Leaf.NotAfter.Sub(before); got < time.Hour-2*time.Second || got > time.Hour+2*time.Second {
				t.Errorf("validity %s, want about 1h", got)
			}
			// The chain holds leaf + intermediate; the root is the trust bundle.
			certs, _ := parseCerts(b.CertChainPEM)
			if len(certs) != 2 || !certs[1].Equal(f.CA.Intermediate) {
				t.Errorf("chain: %d certificates", len(certs))
			}
			if !bytes.Equal(b.RootsPEM, f.CA.RootPEM) {
				t.Error("roots are not the CA chain's self-signed root")
			}
			if _, err := b.TLSCertificate(); err != nil {
				t.Errorf("TLS certificate: %v", err)
			}
			reqs := f.Requests()
			req := reqs[len(reqs)-1]
			if req.TemplateArn != passthrough || req.SigningAlgorithm != "SHA256WITHECDSA" || req.Validity.Type != "ABSOLUTE" || req.IdempotencyToken == "" {
				t.Errorf("IssueCertificate request: %+v", req)
			}
			if req.ApiPassthrough == nil || len(req.ApiPassthrough.Extensions.SubjectAlternativeNames) != 1 ||
				req.ApiPassthrough.Extensions.SubjectAlternativeNames[0].UniformResourceIdentifier != testFleetID {
				t.Errorf("ApiPassthrough SAN: %+v", req.ApiPassthrough)
			}
			block, _ := pem.Decode(req.Csr)
			csr, _ := x509.ParseCertificateRequest(block.Bytes)
			if len(csr.Subject.Names) != 0 || csr.URIs[0].String() != testFleetID {
				t.Errorf("CSR subject %v, URIs %v", csr.Subject, csr.URIs)
			}
			// The CA polled: in progress twice, then issued.
			if n := f.Polls(b.Leaf); n != 3 {
				t.Errorf("GetCertificate called %d times, want 3 (2 in progress + 1)", n)
			}
			// The key never left: no request carries it.
			keyBlock, _ := pem.Decode(b.KeyPEM)
			if keyBlock == nil || len(f.Bodies()) == 0 {
				t.Fatalf("nothing to check: key block %v, %d requests to the CA", keyBlock != nil, len(f.Bodies()))
			}
			for _, body := range f.Bodies() {
				if bytes.Contains(body, []byte("PRIVATE KEY")) || bytes.Contains(body, keyBlock.Bytes) {
					t.Fatal("a request to the CA carries the private key")
				}
			}
		})
	}
}

func TestACMPCAIssueRejectsBadCertificates(t *testing.T) {
	f, srv := newFakePCA(t)
	f.SetURI("spiffe://cluster.local/ns/other/sa/other")
	_, err := testIssuer(srv).Issue(context.Background())
	if err == nil || !strings.Contains(err.Error(), "do not include identity.spiffeID") {
		t.Fatalf("a certificate for another identity was accepted: %v", err)
	}

	f.SetURI("")
	iss := testIssuer(srv)
	other, err := meshtest.NewCA("other-mesh")
	if err != nil {
		t.Fatal(err)
	}
	iss.Roots = func() ([]byte, error) { return other.RootPEM, nil }
	if _, err := iss.Issue(context.Background()); err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("a certificate not chaining to the configured roots was accepted: %v", err)
	}

	f.SetFailIssue(func(int) string { return "InvalidStateException" })
	_, err = testIssuer(srv).Issue(context.Background())
	if err == nil || !strings.Contains(err.Error(), "InvalidStateException") {
		t.Fatalf("a CA error was not reported: %v", err)
	}

	f.SetFailIssue(nil)
	f.SetInProgress(1000)
	iss = testIssuer(srv)
	iss.MaxWait = 300 * time.Millisecond
	if _, err := iss.Issue(context.Background()); err == nil || !strings.Contains(err.Error(), "GetCertificate") {
		t.Fatalf("waiting forever was not bounded: %v", err)
	}
}

func TestRenewalTime(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := &Bundle{Leaf: &x509.Certificate{NotBefore: nb, NotAfter: nb.Add(24 * time.Hour)}}
	for _, tc := range []struct {
		rnd  float64
		want time.Duration
	}{{0.5, 12 * time.Hour}, {0, 12*time.Hour - 72*time.Minute}, {1, 12*time.Hour + 72*time.Minute}} {
		r := &Rotator{RenewAt: 0.5, Jitter: 0.1, Rand: func() float64 { return tc.rnd }}
		if got := r.RenewalTime(b).Sub(nb); got != tc.want {
			t.Errorf("rand %g: renew after %s, want %s", tc.rnd, got, tc.want)
		}
	}
	r := &Rotator{RenewAt: 0.8, Jitter: 0}
	if got := r.RenewalTime(b).Sub(nb); got != time.Duration(0.8*float64(24*time.Hour)) {
		t.Errorf("no jitter: %s", got)
	}
}

func TestRotatorRenewsAndKeepsServingOnFailure(t *testing.T) {
	f, srv := newFakePCA(t)
	f.SetInProgress(1)
	iss := testIssuer(srv)
	iss.Validity = 4 * time.Second
	first, err := iss.Issue(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The first renewal attempts fail twice: the CA is briefly unavailable.
	base := f.Issues()
	f.SetFailIssue(func(n int) string {
		if n == base+1 || n == base+2 {
			return "InvalidStateException"
		}
		return ""
	})

	type event struct {
		b     *Bundle
		err   error
		retry time.Duration
	}
	events := make(chan event, 16)
	r := &Rotator{
		Issue: iss.Issue, RenewAt: 0.5, Jitter: 0.1,
		Backoff:  waitBackoff(20 * time.Millisecond),
		OnRotate: func(b *Bundle) { events <- event{b: b} },
		OnError:  func(err error, retry time.Duration) { events <- event{err: err, retry: retry} },
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx, first) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var errs []event
	var rotated *Bundle
	deadline := time.After(15 * time.Second)
	for rotated == nil {
		select {
		case e := <-events:
			if e.err != nil {
				errs = append(errs, e)
				continue
			}
			rotated = e.b
		case <-deadline:
			t.Fatal("no rotation within 15s")
		}
	}
	if len(errs) != 2 {
		t.Fatalf("%d failed attempts before the rotation, want 2", len(errs))
	}
	if errs[1].retry <= errs[0].retry/2 || errs[0].retry <= 0 {
		t.Errorf("retry delays %s then %s do not back off", errs[0].retry, errs[1].retry)
	}
	if rotated.Fingerprint() == first.Fingerprint() || bytes.Equal(rotated.KeyPEM, first.KeyPEM) {
		t.Fatal("rotation did not produce a new certificate and key")
	}
	if time.Now().After(first.NotAfter()) {
		t.Error("the rotation happened after the old certificate expired")
	}
	// It was renewed around half-life (±5%), not at once.
	life := first.Leaf.NotAfter.Sub(first.Leaf.NotBefore)
	if since := rotated.Leaf.NotBefore.Sub(first.Leaf.NotBefore); since < time.Duration(float64(life)*0.45)-time.Second {
		t.Errorf("renewed %s after issue, before the renewal point of a %s lifetime", since, life)
	}
}

func TestPersist(t *testing.T) {
	_, srv := newFakePCA(t)
	b, err := testIssuer(srv).Issue(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "identity")
	if err := Persist(dir, b); err != nil {
		t.Fatal(err)
	}
	files := PersistedFiles(dir, testFleetID)
	st, err := os.Stat(files.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
	loaded, err := files.Load()
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Fingerprint() != b.Fingerprint() || !bytes.Equal(loaded.KeyPEM, b.KeyPEM) {
		t.Error("persisted identity differs")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 3 {
		t.Errorf("%d files in %s, want 3 (no temporary files left)", len(entries), dir)
	}
}

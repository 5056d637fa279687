package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"

	"github.com/fwdproxy/fwdproxy/internal/awstest"
)

// The tests in this file run the ACM PCA issuer against moto_server, an AWS Private CA we did
// not write. moto implements creating a CA, its CSR, self-issuing and importing its certificate,
// IssueCertificate (the CSR's subject alternative names passed through) and GetCertificate. It
// ignores ApiPassthrough, Validity and SigningAlgorithm (every certificate is RSA/SHA-512 for a
// year) and answers GetCertificate at once, so the template's URI SAN passed as an API parameter,
// the requested validity and the wait for a pending certificate stay covered by the in-repo
// stand-in (meshtest.ACMPCA, acmpca_test.go).

// motoRootCA creates a root CA in moto the way an operator does in AWS: create it, issue its own
// certificate from its CSR with the RootCACertificate template, import that certificate.
func motoRootCA(t *testing.T, client *acmpca.Client) (arn string, root *x509.Certificate) {
	t.Helper()
	ctx := context.Background()
	ca, err := client.CreateCertificateAuthority(ctx, &acmpca.CreateCertificateAuthorityInput{
		CertificateAuthorityType: types.CertificateAuthorityTypeRoot,
		CertificateAuthorityConfiguration: &types.CertificateAuthorityConfiguration{
			KeyAlgorithm:     types.KeyAlgorithmRsa2048,
			SigningAlgorithm: types.SigningAlgorithmSha256withrsa,
			Subject:          &types.ASN1Subject{Organization: aws.String("cluster.local"), CommonName: aws.String("fwdproxy test root")},
		},
	})
	if err != nil {
		t.Fatalf("CreateCertificateAuthority: %v", err)
	}
	arn = aws.ToString(ca.CertificateAuthorityArn)
	csr, err := client.GetCertificateAuthorityCsr(ctx, &acmpca.GetCertificateAuthorityCsrInput{CertificateAuthorityArn: ca.CertificateAuthorityArn})
	if err != nil {
		t.Fatalf("GetCertificateAuthorityCsr: %v", err)
	}
	self, err := client.IssueCertificate(ctx, &acmpca.IssueCertificateInput{
		CertificateAuthorityArn: ca.CertificateAuthorityArn,
		Csr:                     []byte(aws.ToString(csr.Csr)),
		SigningAlgorithm:        types.SigningAlgorithmSha256withrsa,
		TemplateArn:             aws.String("arn:aws:acm-pca:::template/RootCACertificate/V1"),
		Validity:                &types.Validity{Type: types.ValidityPeriodTypeYears, Value: aws.Int64(10)},
	})
	if err != nil {
		t.Fatalf("IssueCertificate (root): %v", err)
	}
	got, err := client.GetCertificate(ctx, &acmpca.GetCertificateInput{CertificateAuthorityArn: ca.CertificateAuthorityArn, CertificateArn: self.CertificateArn})
	if err != nil {
		t.Fatalf("GetCertificate (root): %v", err)
	}
	if _, err := client.ImportCertificateAuthorityCertificate(ctx, &acmpca.ImportCertificateAuthorityCertificateInput{
		CertificateAuthorityArn: ca.CertificateAuthorityArn,
		Certificate:             []byte(aws.ToString(got.Certificate)),
	}); err != nil {
		t.Fatalf("ImportCertificateAuthorityCertificate: %v", err)
	}
	block, _ := pem.Decode([]byte(aws.ToString(got.Certificate)))
	if block == nil {
		t.Fatal("moto's root certificate is not PEM")
	}
	if root, err = x509.ParseCertificate(block.Bytes); err != nil {
		t.Fatal(err)
	}
	return arn, root
}

func motoIssuer(t *testing.T) (*ACMPCA, *x509.Certificate) {
	m := awstest.Start(t)
	client := acmpca.NewFromConfig(m.Config())
	arn, root := motoRootCA(t, client)
	return &ACMPCA{
		Client: client, CertificateAuthorityARN: arn, SPIFFEID: testFleetID,
		SigningAlgorithm: "SHA256WITHECDSA", TemplateARN: passthrough, Validity: time.Hour,
		KeyAlgorithm: "ECDSA_P256", PollDelay: 10 * time.Millisecond, MaxWait: 10 * time.Second,
	}, root
}

// TestACMPCAIssueMoto: a fresh key per issue, the SPIFFE ID as the only name, the chain verified
// up to the CA's own self-signed root (taken from the chain moto returns), for each key type.
func TestACMPCAIssueMoto(t *testing.T) {
	iss, root := motoIssuer(t)
	ctx := context.Background()
	for _, alg := range []string{"ECDSA_P256", "ECDSA_P384", "RSA_2048"} {
		t.Run(alg, func(t *testing.T) {
			iss.KeyAlgorithm = alg
			b, err := iss.Issue(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(b.Leaf.URIs) != 1 || b.Leaf.URIs[0].String() != testFleetID || b.SPIFFEID != testFleetID {
				t.Fatalf("leaf URIs %v, want only %s", b.Leaf.URIs, testFleetID)
			}
			if len(b.Leaf.DNSNames)+len(b.Leaf.IPAddresses)+len(b.Leaf.EmailAddresses) != 0 {
				t.Errorf("leaf has names other than the SPIFFE ID: %v %v %v", b.Leaf.DNSNames, b.Leaf.IPAddresses, b.Leaf.EmailAddresses)
			}
			roots, err := parseCerts(b.RootsPEM)
			if err != nil || len(roots) != 1 || !roots[0].Equal(root) {
				t.Fatalf("roots: %d certificates (%v), want the CA's root", len(roots), err)
			}
			if err := b.Leaf.CheckSignatureFrom(root); err != nil {
				t.Errorf("leaf not signed by the moto CA: %v", err)
			}
			chain, _ := parseCerts(b.CertChainPEM)
			if len(chain) != 1 {
				t.Errorf("chain holds %d certificates, want the leaf alone (the root goes to the trust bundle)", len(chain))
			}
			if _, err := tls.X509KeyPair(b.CertChainPEM, b.KeyPEM); err != nil {
				t.Errorf("the bundle's key does not match the issued certificate: %v", err)
			}
		})
	}
}

// TestACMPCAUnknownCAMoto: moto's answer for a CA that does not exist surfaces with the call named.
func TestACMPCAUnknownCAMoto(t *testing.T) {
	iss, _ := motoIssuer(t)
	iss.CertificateAuthorityARN = "arn:aws:acm-pca:" + awstest.Region + ":" + awstest.Account + ":certificate-authority/00000000-0000-0000-0000-000000000000"
	_, err := iss.Issue(context.Background())
	if err == nil || !strings.Contains(err.Error(), "ACM PCA IssueCertificate") || !strings.Contains(err.Error(), "ResourceNotFound") {
		t.Fatalf("err = %v, want ACM PCA IssueCertificate: ResourceNotFoundException", err)
	}
}

// TestACMPCARenewalMoto: the rotator renews from moto when the renewal point is reached, a new key
// and certificate from the same CA. moto's certificates last a year, so the rotator's clock is
// moved past half-life instead of waiting.
func TestACMPCARenewalMoto(t *testing.T) {
	iss, root := motoIssuer(t)
	first, err := iss.Issue(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	life := first.Leaf.NotAfter.Sub(first.Leaf.NotBefore)
	// The clock is moved once: after the first renewal it is real again, so the next renewal is
	// half a year away and Run waits for cancellation.
	var renewed atomic.Bool
	rotated := make(chan *Bundle, 1)
	r := &Rotator{
		Issue: iss.Issue, RenewAt: 0.5,
		Now: func() time.Time {
			if renewed.Load() {
				return time.Now()
			}
			return time.Now().Add(life/2 + time.Minute)
		},
		OnRotate: func(b *Bundle) {
			if !renewed.Swap(true) {
				rotated <- b
			}
		},
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
	select {
	case next := <-rotated:
		if next.Fingerprint() == first.Fingerprint() || string(next.KeyPEM) == string(first.KeyPEM) {
			t.Fatal("renewal did not produce a new certificate and key")
		}
		if err := next.Leaf.CheckSignatureFrom(root); err != nil || next.SPIFFEID != testFleetID {
			t.Fatalf("renewed certificate: %v, identity %s", err, next.SPIFFEID)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no renewal within 30s")
	}
}

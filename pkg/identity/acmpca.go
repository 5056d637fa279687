package identity

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
)

// ACMPCAClient is the part of the AWS Private CA API the issuer uses (*acmpca.Client).
type ACMPCAClient interface {
	IssueCertificate(context.Context, *acmpca.IssueCertificateInput, ...func(*acmpca.Options)) (*acmpca.IssueCertificateOutput, error)
	acmpca.GetCertificateAPIClient
}

// NewACMPCAClient builds a client with the default AWS credential chain (environment, shared
// files, the instance's role). endpoint overrides the service URL when not empty.
func NewACMPCAClient(ctx context.Context, region, endpoint string) (*acmpca.Client, error) {
	cfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(region))
	if err != nil {
		return nil, fmt.Errorf("AWS configuration: %w", err)
	}
	return acmpca.NewFromConfig(cfg, func(o *acmpca.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	}), nil
}

// ACMPCA issues the fleet identity from an AWS Private CA. Each Issue generates a fresh key pair
// in memory, sends only a CSR carrying the SPIFFE URI SAN, and waits for the certificate. The key
// is never logged or sent anywhere; it leaves memory only through Persist, when asked to.
type ACMPCA struct {
	Client                  ACMPCAClient
	CertificateAuthorityARN string
	SPIFFEID                string
	// SigningAlgorithm, e.g. SHA256WITHECDSA.
	SigningAlgorithm string
	// TemplateARN; an APIPassthrough template also receives the URI SAN as an API parameter.
	TemplateARN string
	// Validity of each certificate.
	Validity time.Duration
	// KeyAlgorithm: ECDSA_P256, ECDSA_P384 or RSA_2048.
	KeyAlgorithm string
	// Roots returns the mesh's root bundle; nil takes the self-signed certificates that end the
	// chain the CA returns.
	Roots func() ([]byte, error)
	// MaxWait bounds the wait for an issued certificate; default 2 minutes.
	MaxWait time.Duration
	// PollDelay is the shortest wait between GetCertificate calls; default 1s.
	PollDelay time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Issue obtains a new certificate and returns it as a verified bundle.
func (a *ACMPCA) Issue(ctx context.Context) (*Bundle, error) {
	now := a.now()
	key, err := generateKey(a.KeyAlgorithm)
	if err != nil {
		return nil, err
	}
	uri, err := url.Parse(a.SPIFFEID)
	if err != nil {
		return nil, fmt.Errorf("SPIFFE ID %q: %w", a.SPIFFEID, err)
	}
	// Like Istio's agent: an empty subject and the SPIFFE ID as the only name.
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{uri}}, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR: %w", err)
	}
	csrPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})
	token := make([]byte, 16)
	if _, err := rand.Read(token); err != nil {
		return nil, err
	}
	in := &acmpca.IssueCertificateInput{
		CertificateAuthorityArn: aws.String(a.CertificateAuthorityARN),
		Csr:                     csrPEM,
		SigningAlgorithm:        types.SigningAlgorithm(a.SigningAlgorithm),
		TemplateArn:             aws.String(a.TemplateARN),
		Validity: &types.Validity{
			Type:  types.ValidityPeriodTypeAbsolute,
			Value: aws.Int64(now.Add(a.Validity).Unix()),
		},
		IdempotencyToken: aws.String(hex.EncodeToString(token)),
	}
	if strings.Contains(a.TemplateARN, "APIPassthrough") || strings.Contains(a.TemplateARN, "APICSRPassthrough") {
		in.ApiPassthrough = &types.ApiPassthrough{Extensions: &types.Extensions{
			SubjectAlternativeNames: []types.GeneralName{{UniformResourceIdentifier: aws.String(a.SPIFFEID)}},
		}}
	}
	issued, err := a.Client.IssueCertificate(ctx, in)
	if err != nil {
		return nil, fmt.Errorf("ACM PCA IssueCertificate: %w", err)
	}
	maxWait := a.MaxWait
	if maxWait <= 0 {
		maxWait = 2 * time.Minute
	}
	delay := a.PollDelay
	if delay <= 0 {
		delay = time.Second
	}
	waiter := acmpca.NewCertificateIssuedWaiter(a.Client, func(o *acmpca.CertificateIssuedWaiterOptions) {
		o.MinDelay = delay
		o.MaxDelay = max(delay, 10*time.Second)
	})
	out, err := waiter.WaitForOutput(ctx, &acmpca.GetCertificateInput{
		CertificateAuthorityArn: aws.String(a.CertificateAuthorityARN),
		CertificateArn:          issued.CertificateArn,
	}, maxWait)
	if err != nil {
		return nil, fmt.Errorf("ACM PCA GetCertificate %s: %w", aws.ToString(issued.CertificateArn), err)
	}
	chainPEM, selfSigned, err := splitChain(aws.ToString(out.Certificate), aws.ToString(out.CertificateChain))
	if err != nil {
		return nil, err
	}
	roots := selfSigned
	if a.Roots != nil {
		if roots, err = a.Roots(); err != nil {
			return nil, fmt.Errorf("identity.acmpca.roots: %w", err)
		}
	}
	if len(roots) == 0 {
		return nil, errors.New("the CA's certificate chain ends in no self-signed root; set identity.acmpca.roots to the mesh's root bundle")
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	b, err := New(a.SPIFFEID, chainPEM, keyPEM, roots, a.now())
	if err != nil {
		return nil, fmt.Errorf("certificate issued by ACM PCA rejected: %w", err)
	}
	return b, nil
}

func (a *ACMPCA) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

func generateKey(alg string) (crypto.Signer, error) {
	switch alg {
	case "", "ECDSA_P256":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ECDSA_P384":
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "RSA_2048":
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return nil, fmt.Errorf("key algorithm %q is not supported; use ECDSA_P256, ECDSA_P384 or RSA_2048", alg)
}

// splitChain returns the leaf followed by the chain's intermediates, and the chain's
// self-signed certificates (roots) apart, since the mesh's chain files hold leaf + intermediates.
func splitChain(leafPEM, chain string) (chainPEM, rootsPEM []byte, err error) {
	leaf, rest := pem.Decode([]byte(leafPEM))
	if leaf == nil || leaf.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) > 0 {
		return nil, nil, errors.New("ACM PCA returned a certificate that is not one PEM CERTIFICATE")
	}
	chainPEM = pem.EncodeToMemory(leaf)
	certs, err := parseCerts([]byte(chain))
	if err != nil {
		return nil, nil, fmt.Errorf("ACM PCA certificate chain: %w", err)
	}
	for _, c := range certs {
		block := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
		if bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil {
			rootsPEM = append(rootsPEM, block...)
		} else {
			chainPEM = append(chainPEM, block...)
		}
	}
	return chainPEM, rootsPEM, nil
}

// PersistedFiles are the file names Persist writes in a directory (Istio's agent's names).
func PersistedFiles(dir, spiffeID string) Files {
	return Files{SPIFFEID: spiffeID, CertChain: filepath.Join(dir, "cert-chain.pem"),
		PrivateKey: filepath.Join(dir, "key.pem"), Roots: filepath.Join(dir, "root-cert.pem")}
}

// Persist writes b to dir: the key 0600, each file replaced atomically, the key first so a
// chain on disk never lacks its key.
func Persist(dir string, b *Bundle) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f := PersistedFiles(dir, b.SPIFFEID)
	for _, w := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{f.PrivateKey, b.KeyPEM, 0o600}, {f.CertChain, b.CertChainPEM, 0o644}, {f.Roots, b.RootsPEM, 0o644}} {
		tmp, err := os.CreateTemp(dir, ".tmp-*")
		if err != nil {
			return err
		}
		err = tmp.Chmod(w.mode)
		if err == nil {
			_, err = tmp.Write(w.data)
		}
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(tmp.Name(), w.path)
		}
		if err != nil {
			os.Remove(tmp.Name())
			return fmt.Errorf("persist identity to %s: %w", dir, err)
		}
	}
	return nil
}

package meshtest

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// ACMPCA stands in for AWS Private CA's API as the SDK speaks it (JSON 1.1 over HTTP POST,
// X-Amz-Target ACMPrivateCA.IssueCertificate / ACMPrivateCA.GetCertificate, SigV4-signed),
// signing CSRs with a CA as a private CA subordinate to the mesh root would. GetCertificate
// answers RequestInProgressException a set number of times per certificate first.
type ACMPCA struct {
	CA    *CA
	CAARN string

	mu         sync.Mutex
	inProgress int
	failIssue  func(n int) string
	uri        string
	issues     int
	polls      map[string]int
	certs      map[string]*x509.Certificate
	requests   []IssueRequest
	bodies     [][]byte
}

// IssueRequest is an IssueCertificate request as received.
type IssueRequest struct {
	CertificateAuthorityArn string
	Csr                     []byte
	SigningAlgorithm        string
	TemplateArn             string
	Validity                struct {
		Type  string
		Value int64
	}
	IdempotencyToken string
	ApiPassthrough   *struct {
		Extensions struct {
			SubjectAlternativeNames []struct{ UniformResourceIdentifier string }
		}
	}
}

// NewACMPCA serves CA as the private CA named arn; GetCertificate is in progress twice per
// certificate before it answers.
func NewACMPCA(ca *CA, arn string) *ACMPCA {
	return &ACMPCA{CA: ca, CAARN: arn, inProgress: 2, polls: map[string]int{}, certs: map[string]*x509.Certificate{}}
}

// SetInProgress sets how many GetCertificate calls per certificate answer "in progress".
func (f *ACMPCA) SetInProgress(n int) { f.mu.Lock(); f.inProgress = n; f.mu.Unlock() }

// SetFailIssue makes the n-th IssueCertificate call (counting from 1) fail with the error type
// fail returns, when it returns one.
func (f *ACMPCA) SetFailIssue(fail func(n int) string) {
	f.mu.Lock()
	f.failIssue = fail
	f.mu.Unlock()
}

// SetURI makes the CA sign this URI SAN instead of the CSR's (a misbehaving CA).
func (f *ACMPCA) SetURI(uri string) { f.mu.Lock(); f.uri = uri; f.mu.Unlock() }

// Issues is how many IssueCertificate calls arrived.
func (f *ACMPCA) Issues() int { f.mu.Lock(); defer f.mu.Unlock(); return f.issues }

// Requests are the IssueCertificate requests received.
func (f *ACMPCA) Requests() []IssueRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]IssueRequest(nil), f.requests...)
}

// Bodies are the raw bodies of every request received.
func (f *ACMPCA) Bodies() [][]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([][]byte(nil), f.bodies...)
}

// Polls is how many GetCertificate calls asked for cert.
func (f *ACMPCA) Polls(cert *x509.Certificate) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	for arn, c := range f.certs {
		if c.Equal(cert) {
			return f.polls[arn]
		}
	}
	return 0
}

func awsError(w http.ResponseWriter, status int, typ, msg string) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.Header().Set("X-Amzn-ErrorType", typ)
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"__type": typ, "message": msg})
}

func (f *ACMPCA) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bodies = append(f.bodies, body)
	if r.Method != http.MethodPost || !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 ") {
		awsError(w, 403, "AccessDeniedException", "request is not SigV4-signed")
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	switch target := r.Header.Get("X-Amz-Target"); target {
	case "ACMPrivateCA.IssueCertificate":
		var req IssueRequest
		if err := json.Unmarshal(body, &req); err != nil {
			awsError(w, 400, "ValidationException", err.Error())
			return
		}
		f.issues++
		f.requests = append(f.requests, req)
		if f.failIssue != nil {
			if typ := f.failIssue(f.issues); typ != "" {
				awsError(w, 400, typ, "the CA is not available")
				return
			}
		}
		if req.CertificateAuthorityArn != f.CAARN {
			awsError(w, 400, "ResourceNotFoundException", "no such CA")
			return
		}
		block, _ := pem.Decode(req.Csr)
		if block == nil || block.Type != "CERTIFICATE REQUEST" {
			awsError(w, 400, "MalformedCSRException", "not a PEM CSR")
			return
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err == nil {
			err = csr.CheckSignature()
		}
		if err != nil {
			awsError(w, 400, "MalformedCSRException", err.Error())
			return
		}
		uris := csr.URIs
		if f.uri != "" {
			u, _ := url.Parse(f.uri)
			uris = []*url.URL{u}
		}
		now := time.Now().Truncate(time.Second)
		cert, err := f.CA.Sign(&x509.Certificate{
			NotBefore: now, NotAfter: time.Unix(req.Validity.Value, 0), URIs: uris,
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}, csr.PublicKey)
		if err != nil {
			awsError(w, 500, "InternalFailure", err.Error())
			return
		}
		arn := fmt.Sprintf("%s/certificate/%x", f.CAARN, cert.SerialNumber)
		f.certs[arn] = cert
		json.NewEncoder(w).Encode(map[string]string{"CertificateArn": arn})
	case "ACMPrivateCA.GetCertificate":
		var req struct{ CertificateAuthorityArn, CertificateArn string }
		if err := json.Unmarshal(body, &req); err != nil {
			awsError(w, 400, "ValidationException", err.Error())
			return
		}
		cert, ok := f.certs[req.CertificateArn]
		if !ok {
			awsError(w, 400, "ResourceNotFoundException", "no such certificate")
			return
		}
		f.polls[req.CertificateArn]++
		if f.polls[req.CertificateArn] <= f.inProgress {
			awsError(w, 400, "RequestInProgressException", "The request is still in progress")
			return
		}
		json.NewEncoder(w).Encode(map[string]string{
			"Certificate":      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})),
			"CertificateChain": string(f.CA.IntermediatePEM) + string(f.CA.RootPEM),
		})
	default:
		awsError(w, 400, "UnknownOperationException", target)
	}
}

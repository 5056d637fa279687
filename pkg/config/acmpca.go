package config

import (
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws/arn"
)

// APIPassthroughTemplateARN is ACM PCA's end-entity template that takes the certificate's
// extensions, including the SPIFFE URI SAN, from the request and the CSR.
const APIPassthroughTemplateARN = "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"

// ACMPCAIdentity issues the fleet identity from AWS Private CA. The key pair is generated in
// memory on each node and never leaves it; only the CSR is sent.
type ACMPCAIdentity struct {
	// CertificateAuthorityARN of the private CA chained to the mesh's root.
	CertificateAuthorityARN string `yaml:"certificateAuthorityArn"`
	// Region of the CA; default the region in the ARN.
	Region string `yaml:"region"`
	// SigningAlgorithm the CA signs with; default SHA256WITHECDSA for EC keys, SHA256WITHRSA for RSA.
	SigningAlgorithm string `yaml:"signingAlgorithm"`
	// TemplateARN of the issuance template; default the APIPassthrough end-entity template.
	TemplateARN string `yaml:"templateArn"`
	// Validity of each certificate; default 24h.
	Validity time.Duration `yaml:"validity"`
	// RenewAt is the fraction of the lifetime after which a new certificate is requested;
	// default 0.5.
	RenewAt float64 `yaml:"renewAt"`
	// Jitter spreads the fleet's renewals: a random share of the lifetime, up to this fraction,
	// centred on RenewAt; default 0.1.
	Jitter *float64 `yaml:"jitter"`
	// KeyAlgorithm of the node's key: ECDSA_P256 (default), ECDSA_P384 or RSA_2048.
	KeyAlgorithm string `yaml:"keyAlgorithm"`
	// Roots is a PEM file with the mesh's root bundle; default: the self-signed certificate(s)
	// ending the chain the CA returns.
	Roots string `yaml:"roots"`
	// Endpoint overrides the ACM PCA endpoint URL (a VPC endpoint, or a test server).
	Endpoint string `yaml:"endpoint"`
	// PersistDir, when set, keeps the issued chain and key (0600) there and reuses them after a
	// restart while they are before their renewal time. Default: kept in memory only.
	PersistDir string `yaml:"persistDir"`
	// IssueTimeout bounds the first issuance at start; default 2m.
	IssueTimeout time.Duration `yaml:"issueTimeout"`
}

func (c *Config) acmpcaDefaults() {
	a := c.Identity.ACMPCA
	if a == nil {
		return
	}
	if a.Region == "" {
		if parsed, err := arn.Parse(a.CertificateAuthorityARN); err == nil {
			a.Region = parsed.Region
		}
	}
	if a.KeyAlgorithm == "" {
		a.KeyAlgorithm = "ECDSA_P256"
	}
	if a.SigningAlgorithm == "" {
		a.SigningAlgorithm = "SHA256WITHECDSA"
		if strings.HasPrefix(a.KeyAlgorithm, "RSA") {
			a.SigningAlgorithm = "SHA256WITHRSA"
		}
	}
	if a.TemplateARN == "" {
		a.TemplateARN = APIPassthroughTemplateARN
	}
	if a.Validity == 0 {
		a.Validity = 24 * time.Hour
	}
	if a.RenewAt == 0 {
		a.RenewAt = 0.5
	}
	if a.Jitter == nil {
		j := 0.1
		a.Jitter = &j
	}
	if a.IssueTimeout == 0 {
		a.IssueTimeout = 2 * time.Minute
	}
}

var signingAlgorithms = map[string]bool{
	"SHA256WITHECDSA": true, "SHA384WITHECDSA": true, "SHA512WITHECDSA": true,
	"SHA256WITHRSA": true, "SHA384WITHRSA": true, "SHA512WITHRSA": true,
}

func (c *Config) acmpcaProblems(p *problems) {
	a := c.Identity.ACMPCA
	if a == nil {
		return
	}
	const f = "identity.acmpca."
	if a.CertificateAuthorityARN == "" {
		p.Addf(f+"certificateAuthorityArn", "required: the ARN of the private CA that issues the fleet identity")
	} else if parsed, err := arn.Parse(a.CertificateAuthorityARN); err != nil || parsed.Service != "acm-pca" || !strings.HasPrefix(parsed.Resource, "certificate-authority/") {
		p.Addf(f+"certificateAuthorityArn", "%q is not a private CA ARN; write arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID", a.CertificateAuthorityARN)
	}
	if a.Region == "" {
		p.Addf(f+"region", "required when the CA ARN names no region, e.g. eu-west-1")
	}
	switch a.KeyAlgorithm {
	case "ECDSA_P256", "ECDSA_P384", "RSA_2048":
	default:
		p.Addf(f+"keyAlgorithm", "%q is not supported; use ECDSA_P256 (default), ECDSA_P384 or RSA_2048", a.KeyAlgorithm)
	}
	// The CA's own key type decides the signing algorithm, not the node's key: any pairing works.
	if _, ok := signingAlgorithms[a.SigningAlgorithm]; !ok {
		p.Addf(f+"signingAlgorithm", "%q is not supported; use SHA256WITHECDSA (EC CA) or SHA256WITHRSA (RSA CA)", a.SigningAlgorithm)
	}
	if parsed, err := arn.Parse(a.TemplateARN); err != nil || parsed.Service != "acm-pca" || !strings.HasPrefix(parsed.Resource, "template/") {
		p.Addf(f+"templateArn", "%q is not an ACM PCA template ARN; the default %s passes the SPIFFE URI SAN through", a.TemplateARN, APIPassthroughTemplateARN)
	}
	if a.Validity < 10*time.Minute {
		p.Addf(f+"validity", "%s is too short; use at least 10m (default 24h)", a.Validity)
	}
	if a.RenewAt <= 0 || a.RenewAt >= 1 {
		p.Addf(f+"renewAt", "%g is not a fraction of the lifetime between 0 and 1; the default 0.5 renews at half-life", a.RenewAt)
	}
	if j := *a.Jitter; j < 0 || j >= 1 || a.RenewAt-j/2 <= 0 || a.RenewAt+j/2 >= 1 {
		p.Addf(f+"jitter", "%g must be at least 0 and keep renewAt ± jitter/2 inside (0, 1), e.g. 0.1", j)
	}
	if a.IssueTimeout < 0 {
		p.Addf(f+"issueTimeout", "must be positive, e.g. 2m")
	}
}

package config

import (
	"strings"
	"testing"
	"time"
)

const pcaBase = `
gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  acmpca:
    certificateAuthorityArn: arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/11111111-2222-3333-4444-555555555555
`

func TestACMPCADefaults(t *testing.T) {
	c, err := Parse("c.yaml", []byte(pcaBase))
	if err != nil {
		t.Fatal(err)
	}
	a := c.Identity.ACMPCA
	if a.Region != "eu-west-1" || a.KeyAlgorithm != "ECDSA_P256" || a.SigningAlgorithm != "SHA256WITHECDSA" ||
		a.TemplateARN != APIPassthroughTemplateARN || a.Validity != 24*time.Hour || a.RenewAt != 0.5 || *a.Jitter != 0.1 ||
		a.IssueTimeout != 2*time.Minute || a.PersistDir != "" {
		t.Errorf("defaults: %+v", a)
	}
}

func TestACMPCAErrors(t *testing.T) {
	cases := []struct{ name, extra, want string }{
		{"bad arn", "    certificateAuthorityArn: arn:aws:s3:::bucket\n", "identity.acmpca.certificateAuthorityArn:"},
		{"key algorithm", "    keyAlgorithm: ED25519\n", `identity.acmpca.keyAlgorithm: "ED25519" is not supported`},
		{"signing algorithm", "    signingAlgorithm: MD5WITHRSA\n", `identity.acmpca.signingAlgorithm: "MD5WITHRSA" is not supported`},
		{"template", "    templateArn: nope\n", "identity.acmpca.templateArn:"},
		{"validity", "    validity: 1m\n", "identity.acmpca.validity: 1m0s is too short"},
		{"renewAt", "    renewAt: 1.5\n", "identity.acmpca.renewAt: 1.5 is not a fraction"},
		{"jitter", "    renewAt: 0.95\n    jitter: 0.2\n", "identity.acmpca.jitter: 0.2 must"},
		{"both sources", "  files: {certChain: c, privateKey: k, roots: r}\n", "identity: set exactly one identity source"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			doc := pcaBase + tc.extra
			if strings.Contains(tc.extra, "certificateAuthorityArn") {
				doc = strings.Replace(pcaBase, "    certificateAuthorityArn: arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/11111111-2222-3333-4444-555555555555\n", tc.extra, 1)
			}
			_, err := Parse("c.yaml", []byte(doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not contain %q", err, tc.want)
			}
		})
	}
}

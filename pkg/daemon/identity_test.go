package daemon

import (
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// An identity that expires takes the instance out of service loudly: not ready, an error in the
// log, fwdproxy_identity_expired 1, and no listener forwarding with it. A renewed certificate
// brings it back.
func TestExpiredIdentityServesNothing(t *testing.T) {
	f := startMeshFixture(t, 6*time.Second) // room to start and carry traffic first, even on a loaded machine
	waitReady(t, f.metricsAddr, 200, "ready")
	eventually(t, "traffic before expiry", func() bool {
		line, _ := f.dial(f.goodPort)
		return strings.HasPrefix(line, "caller ")
	})

	waitReady(t, f.metricsAddr, 503, "identity expired at")
	eventually(t, "the listeners withdrawn", func() bool {
		line, err := f.dial(f.goodPort)
		return line == "" && err != nil
	})
	fams := scrape(t, f.metricsAddr)
	if v, _ := value(fams, "fwdproxy_identity_expired", nil); v != 1 {
		t.Errorf("fwdproxy_identity_expired = %v, want 1", v)
	}
	if !strings.Contains(f.logs.String(), "IDENTITY EXPIRED") {
		t.Errorf("no error logged for the expired identity:\n%s", f.logs.String())
	}
	cur := f.d.XDS.Current()
	if cur == nil || cur.SecretsVersion != "" {
		t.Errorf("the snapshot served while expired still carries secrets: %+v", cur)
	}

	// The operator (or the agent writing the files) renews the certificate.
	leaf, err := f.ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(f.dir, f.ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	waitReady(t, f.metricsAddr, 200, "ready")
	eventually(t, "traffic after renewal", func() bool {
		line, _ := f.dial(f.goodPort)
		return strings.HasPrefix(line, "caller ")
	})
	fams = scrape(t, f.metricsAddr)
	if v, _ := value(fams, "fwdproxy_identity_rotations_total", nil); v != 1 {
		t.Errorf("fwdproxy_identity_rotations_total = %v, want 1", v)
	}
	if v, _ := value(fams, "fwdproxy_identity_expiry_timestamp_seconds", nil); v != float64(leaf.Cert.NotAfter.Unix()) {
		t.Errorf("expiry timestamp %v, want the renewed certificate's %d", v, leaf.Cert.NotAfter.Unix())
	}
	eventually(t, "fwdproxy_identity_expired back to 0", func() bool {
		v, _ := value(scrape(t, f.metricsAddr), "fwdproxy_identity_expired", nil)
		return v == 0
	})
}

// With identity.acmpca the daemon generates its key, has AWS Private CA issue the certificate,
// serves with it, and persists it (key 0600) when asked to.
func TestACMPCAIdentity(t *testing.T) {
	const arn = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/11111111-2222-3333-4444-555555555555"
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	var pca *meshtest.ACMPCA
	f := startMeshFixtureWith(t, time.Hour, func(f *meshFixture) string {
		pca = meshtest.NewACMPCA(f.ca, arn)
		pca.SetInProgress(1)
		srv := httptest.NewServer(pca)
		t.Cleanup(srv.Close)
		return fmt.Sprintf("  acmpca: {certificateAuthorityArn: %q, endpoint: %q, validity: 12h, persistDir: persisted}", arn, srv.URL)
	})
	waitReady(t, f.metricsAddr, 200, "ready")
	eventually(t, "traffic with the issued identity", func() bool {
		line, _ := f.dial(f.goodPort)
		return line == "caller spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy\n"
	})
	if n := pca.Issues(); n != 1 {
		t.Errorf("%d IssueCertificate calls, want 1", n)
	}
	req := pca.Requests()[0]
	if req.TemplateArn != "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1" || req.SigningAlgorithm != "SHA256WITHECDSA" {
		t.Errorf("request: template %s, signing %s", req.TemplateArn, req.SigningAlgorithm)
	}
	b := f.d.currentIdentity()
	if got := b.NotAfter().Sub(b.Leaf.NotBefore); got < 12*time.Hour-5*time.Second || got > 12*time.Hour+5*time.Second {
		t.Errorf("validity %s, want 12h", got)
	}
	v, _ := value(scrape(t, f.metricsAddr), "fwdproxy_identity_expiry_timestamp_seconds", nil)
	if v != float64(b.NotAfter().Unix()) {
		t.Errorf("expiry metric %v, want %d", v, b.NotAfter().Unix())
	}
	st, err := os.Stat(filepath.Join(f.dir, "persisted", "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("persisted key mode %v", st.Mode().Perm())
	}
	if strings.Contains(f.logs.String(), "PRIVATE KEY") {
		t.Error("the private key appears in the log")
	}
}

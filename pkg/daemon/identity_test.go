package daemon

import (
	"strings"
	"testing"
	"time"
)

// An identity that expires takes the instance out of service loudly: not ready, an error in the
// log, fwdproxy_identity_expired 1, and no listener forwarding with it. A renewed certificate
// brings it back.
func TestExpiredIdentityServesNothing(t *testing.T) {
	f := startMeshFixture(t, 3*time.Second)
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

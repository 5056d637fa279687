package catalog

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"
)

// TestDNSNameFastPathMatchesValidation: the fast check accepts exactly what the regular
// expression does.
func TestDNSNameFastPathMatchesValidation(t *testing.T) {
	for _, n := range []string{
		"reviews.default.svc.cluster.local", "a", "a.b", "0.1", "a-b.c-d", "-a.b", "a-.b", "a..b", ".a", "a.",
		"A.b", "a_b.c", "a b", "", strings.Repeat("a", 63) + ".b", strings.Repeat("a", 64) + ".b",
		strings.Repeat("a.", 126) + "a", strings.Repeat("a.", 127) + "a", "xn--bcher-kva.example", "a.-b", "a.b-",
	} {
		if got, want := isDNS1123Subdomain(n), len(validation.IsDNS1123Subdomain(n)) == 0; got != want {
			t.Errorf("%q: fast check %v, validation %v", n, got, want)
		}
	}
}

// TestHostLabelsAreAtMost63Characters: a DNS1123 subdomain bounds the whole name, not its
// labels; a host with a label over 63 characters never resolves and is refused, naming it.
func TestHostLabelsAreAtMost63Characters(t *testing.T) {
	if err := checkHost(strings.Repeat("a", 63) + ".default.svc.cluster.local"); err != nil {
		t.Errorf("a 63-character label refused: %v", err)
	}
	long := strings.Repeat("a", 64)
	err := checkHost(long + ".default.svc.cluster.local")
	if err == nil || !strings.Contains(err.Error(), long) || !strings.Contains(err.Error(), "at most 63") {
		t.Errorf("a 64-character label: %v", err)
	}
}

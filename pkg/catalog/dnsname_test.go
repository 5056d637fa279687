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

package catalog

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// BenchmarkLoad10kServices is what a static catalog file of 10,000 services (an HTTP port and
// a TCP port each) costs to reload, which the file source does on every edit.
func BenchmarkLoad10kServices(b *testing.B) {
	var sb strings.Builder
	sb.WriteString("services:\n")
	for i := range 10000 {
		fmt.Fprintf(&sb, "  - host: svc-%05d.ns-%03d.svc.cluster.local\n    ports: [{number: 8080, protocol: http}, {number: %d, protocol: tcp}]\n    identities: [spiffe://cluster.local/ns/ns-%03d/sa/svc-%05d]\n",
			i, i%100, 20000+i, i%100, i)
	}
	path := filepath.Join(b.TempDir(), "catalog.yaml")
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(sb.Len()))
	for b.Loop() {
		c, err := Load(path, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if len(c.Services) != 10000 {
			b.Fatalf("%d services loaded, want 10000", len(c.Services))
		}
	}
}

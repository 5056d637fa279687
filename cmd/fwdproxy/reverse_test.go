package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const reverseSection = `
reverse:
  port: 15443
  loadBalancer: fwdproxy.nlb.example.internal
  services:
    - host: billing.vm.example.internal
      ports: [{number: 8080, protocol: http}]
      backends: [10.0.1.5]
      allowedPrincipals: [cluster.local/ns/shop/sa/frontend]
`

func TestMeshConfigReverseFromConfig(t *testing.T) {
	cfg := cliConfig(t)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(reverseSection); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	out, stderr, err := run(t, "mesh-config", "--config", cfg, "--reverse")
	if err != nil {
		t.Fatalf("mesh-config --reverse: %v\n%s", err, stderr)
	}
	for _, want := range []string{"kind: ServiceEntry", "kind: DestinationRule", "mode: ISTIO_MUTUAL", "- address: fwdproxy.nlb.example.internal",
		"http-8080: 15443", "- spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", "location: MESH_INTERNAL"} {
		if !strings.Contains(out, want) {
			t.Errorf("mesh-config --reverse lacks %q:\n%s", want, out)
		}
	}
	// The same config renders the inbound listener, also as a static config.
	for _, args := range [][]string{{"render", "--config", cfg}, {"render", "--static", "--config", cfg}} {
		out, stderr, err := run(t, args...)
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr)
		}
		if !strings.Contains(out, "inbound_0.0.0.0_15443") || !strings.Contains(out, "outbound_.8080_._.billing.vm.example.internal") {
			t.Errorf("%v: no inbound listener:\n%.2000s", args, out)
		}
	}

	// --reverse FILE still takes a reverse file; a config without a reverse section says so.
	file := filepath.Join(t.TempDir(), "reverse.yaml")
	if err := os.WriteFile(file, []byte("loadBalancer: 10.0.0.5\nservices: [{host: a.vm.internal, ports: [{number: 80, protocol: http}]}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := run(t, "mesh-config", "--config", cfg, "--reverse", file); err != nil || !strings.Contains(out, "- a.vm.internal") {
		t.Errorf("--reverse FILE: %v %s\n%s", err, stderr, out)
	}
	if _, stderr, err := run(t, "mesh-config", "--config", cliConfig(t), "--reverse"); err == nil || !strings.Contains(stderr, "no reverse.services") {
		t.Errorf("--reverse without a reverse section: %v %s", err, stderr)
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fwdproxy-cli")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "fwdproxy")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// cliConfig writes a config, a catalog and an Istio-style identity into a temp dir.
func cliConfig(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(dir, ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("../../examples/catalog.yaml")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "catalog.yaml"), data, 0o644)
	cfg := `
node: {id: cli-test}
gateways:
  - {name: eastwest-a, address: 10.20.0.10}
  - {name: eastwest-b, address: 10.30.0.10, port: 15444}
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
`
	path := filepath.Join(dir, "config.yaml")
	os.WriteFile(path, []byte(cfg), 0o644)
	return path
}

func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

func TestRenderRedactsKeys(t *testing.T) {
	cfg := cliConfig(t)
	out, stderr, err := run(t, "render", "--config", cfg)
	if err != nil {
		t.Fatalf("render: %v\n%s", err, stderr)
	}
	var doc map[string][]json.RawMessage
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("render output is not JSON: %v", err)
	}
	for _, k := range []string{"listeners", "routes", "clusters", "endpoints", "secrets"} {
		if len(doc[k]) == 0 {
			t.Errorf("render: %s is empty", k)
		}
	}
	if len(doc["clusters"]) != 5 || len(doc["secrets"]) != 2 {
		t.Errorf("render: %d clusters, %d secrets", len(doc["clusters"]), len(doc["secrets"]))
	}
	if strings.Contains(out, "PRIVATE KEY") || strings.Contains(out, "LS0tLS1CRUdJTiBQUklWQVRF") {
		t.Fatal("render output contains the private key")
	}
	if !strings.Contains(out, controlplane.Redacted) {
		t.Fatal("render output does not mark the redacted key")
	}
}

func TestBootstrapIsValidEnvoyConfig(t *testing.T) {
	cfg := cliConfig(t)
	out, stderr, err := run(t, "bootstrap", "--config", cfg)
	if err != nil {
		t.Fatalf("bootstrap: %v\n%s", err, stderr)
	}
	b := &bootstrap.Bootstrap{}
	if err := protojson.Unmarshal([]byte(out), b); err != nil {
		t.Fatalf("bootstrap does not parse as an Envoy Bootstrap: %v", err)
	}
	if err := controlplane.ValidateDeep(b); err != nil {
		t.Fatal(err)
	}
	if b.Node.Id != "cli-test" || b.DynamicResources.AdsConfig.GrpcServices[0].GetEnvoyGrpc().ClusterName != controlplane.XDSClusterName {
		t.Fatalf("bootstrap: %v", b.Node)
	}
	// Envoy reaches the daemon on its Unix socket, never over TCP.
	addr := b.StaticResources.Clusters[0].LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address
	if addr.GetPipe().GetPath() != "/run/fwdproxy/xds.sock" || addr.GetSocketAddress() != nil {
		t.Fatalf("xds endpoint %v, want the pipe /run/fwdproxy/xds.sock", addr)
	}
}

func TestRenderStaticWithFileSDS(t *testing.T) {
	cfg := cliConfig(t)
	sds := filepath.Join(t.TempDir(), "sds")
	out, stderr, err := run(t, "render", "--static", "--write-sds", "--sds-dir", sds, "--config", cfg)
	if err != nil {
		t.Fatalf("render --static: %v\n%s", err, stderr)
	}
	b := &bootstrap.Bootstrap{}
	if err := protojson.Unmarshal([]byte(out), b); err != nil {
		t.Fatalf("static config does not parse: %v", err)
	}
	if err := controlplane.ValidateDeep(b); err != nil {
		t.Fatal(err)
	}
	if b.DynamicResources != nil || len(b.StaticResources.Listeners) != 3 || len(b.StaticResources.Clusters) != 5 {
		t.Fatalf("static config: %d listeners, %d clusters", len(b.StaticResources.Listeners), len(b.StaticResources.Clusters))
	}
	if !strings.Contains(out, `"route_config"`) || strings.Contains(out, `"rds"`) || strings.Contains(out, `"ads"`) {
		t.Fatal("static config still refers to dynamic resources")
	}
	if !strings.Contains(out, `"address": "10.30.0.10"`) || !strings.Contains(out, `"port_value": 15444`) || !strings.Contains(out, "STRICT_DNS") {
		t.Fatal("static config does not reach the configured gateway addresses")
	}
	for _, name := range []string{"default.json", "ROOTCA.json"} {
		data, err := os.ReadFile(filepath.Join(sds, name))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(data), "PRIVATE KEY") || !strings.Contains(string(data), `"filename"`) {
			t.Fatalf("%s should reference files, not embed them:\n%s", name, data)
		}
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	cfg := cliConfig(t)
	out, stderr, err := run(t, "validate", "--config", cfg)
	if err != nil || !strings.Contains(out, "ok: 4 services") {
		t.Fatalf("validate good config: %v\n%s%s", err, out, stderr)
	}
	catalogPath := filepath.Join(filepath.Dir(cfg), "catalog.yaml")
	os.WriteFile(catalogPath, []byte(`services:
  - host: x.ns.svc.cluster.local
    ports: [{number: 99999, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/x]
    allowedClients: [10.0.0.1]
`), 0o644)
	_, stderr, err = run(t, "validate", "--config", cfg)
	if err == nil {
		t.Fatal("validate accepted a bad catalog")
	}
	for _, want := range []string{"catalog.yaml:3: services[0].ports[0].number: 99999 is not a valid port", "catalog.yaml:5: services[0].allowedClients[0]"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
}

// TestDataplaneXDSFlag: the standalone data plane takes the daemon's socket; TCP only with a
// client certificate, since the daemon serves the fleet's key on TCP to no one else.
func TestDataplaneXDSFlag(t *testing.T) {
	_, stderr, err := run(t, "dataplane", "--xds", "127.0.0.1:18000")
	if err == nil || !strings.Contains(stderr, "--xds 127.0.0.1:18000 is TCP, which the daemon serves only to clients with a certificate") || !strings.Contains(stderr, "--xds-cert") {
		t.Fatalf("TCP without a certificate: %v\n%s", err, stderr)
	}
	_, stderr, err = run(t, "dataplane", "--xds", "localhost")
	if err == nil || !strings.Contains(stderr, "neither a socket path") {
		t.Fatalf("a bad address: %v\n%s", err, stderr)
	}
}

func TestUnknownCommand(t *testing.T) {
	_, stderr, err := run(t, "frobnicate")
	if err == nil || !strings.Contains(stderr, `unknown command "frobnicate"`) || !strings.Contains(stderr, "render") {
		t.Fatalf("err=%v stderr=%s", err, stderr)
	}
}

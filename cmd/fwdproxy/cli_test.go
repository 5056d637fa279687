package main

import (
	"encoding/json"
	"errors"
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
	if out, err := exec.Command("go", "build", "-buildvcs=auto", "-o", binary, ".").CombinedOutput(); err != nil {
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
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), data, 0o644); err != nil {
		t.Fatal(err)
	}
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
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
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
	if err := os.WriteFile(catalogPath, []byte(`services:
  - host: x.ns.svc.cluster.local
    ports: [{number: 99999, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/x]
    allowedClients: [10.0.0.1]
`), 0o644); err != nil {
		t.Fatal(err)
	}
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

// TestValidateRefusesUnsafeInput: what would otherwise fail only at run time, or serve something
// other than what was written, is refused by validate with the file, the field and the fix.
func TestValidateRefusesUnsafeInput(t *testing.T) {
	cases := []struct {
		name    string
		catalog string
		want    string
	}{
		{"the daemon's own port", `services:
  - host: x.ns.svc.cluster.local
    ports: [{number: 9102, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/x]
`, "catalog.yaml:3: services[0].ports[0].number: port 9102 is the daemon's own metrics.address (:9102)"},
		{"a fractional port", `services:
  - host: x.ns.svc.cluster.local
    ports: [{number: 80.5, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/x]
`, "catalog.yaml:3: services[0].ports[0].number: 80.5 is not an integer"},
		{"host bits", `services:
  - host: x.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/x]
    allowedClients: [10.0.0.5/8]
`, "did you mean 10.0.0.0/8?"},
		{"only a comment", "# empty for now\n", `the catalog is empty`},
		{"a key others can read", "", `key.pem is mode 0644, readable by group or others; only the daemon may read the fleet's key: chmod 600 `},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := cliConfig(t)
			if tc.catalog != "" {
				if err := os.WriteFile(filepath.Join(filepath.Dir(cfg), "catalog.yaml"), []byte(tc.catalog), 0o644); err != nil {
					t.Fatal(err)
				}
			} else if err := os.Chmod(filepath.Join(filepath.Dir(cfg), "key.pem"), 0o644); err != nil {
				t.Fatal(err)
			}
			_, stderr, err := run(t, "validate", "--config", cfg)
			if err == nil || !strings.Contains(stderr, tc.want) {
				t.Fatalf("validate: err=%v, stderr lacks %q:\n%s", err, tc.want, stderr)
			}
		})
	}
}

// TestValidateSaysWhatIsLeftOut: a service whose gateways did not resolve offline is a warning
// (they may resolve where the daemon runs); any other reason to leave one out fails validate.
func TestValidateSaysWhatIsLeftOut(t *testing.T) {
	var w strings.Builder
	err := reportSkipped(&w, []controlplane.SkippedService{
		{Host: "a.ns.svc.cluster.local", Reason: controlplane.SkipNoGatewayAddress, Detail: `none of its gateways ("b") has a known address yet`},
	}, true)
	if err != nil || w.String() != "warning: service a.ns.svc.cluster.local left out (no_gateway_address): none of its gateways (\"b\") has a known address yet\n" {
		t.Fatalf("err %v, output %q", err, w.String())
	}
	err = reportSkipped(&w, []controlplane.SkippedService{{Host: "b.ns.svc.cluster.local", Reason: controlplane.SkipConflict, Detail: "TCP port 80 is already served by a.ns.svc.cluster.local"}}, true)
	if err == nil || !strings.Contains(err.Error(), "service b.ns.svc.cluster.local would be left out of the configuration (conflict): TCP port 80") {
		t.Fatalf("err = %v", err)
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
	if exitCode(err) != 2 || !strings.Contains(stderr, `unknown command "frobnicate"`) || !strings.Contains(stderr, "Run 'fwdproxy --help' for usage.") {
		t.Fatalf("err=%v stderr=%s", err, stderr)
	}
}

// TestEnvoyAcceptsCLIOutput hands what `fwdproxy bootstrap` and `fwdproxy render --static
// --write-sds` print to Envoy (`envoy --mode validate`), with a gateway given by DNS name for
// Envoy to resolve: Envoy must accept both without a warning. The stats listener the machine
// image merges in is checked in deploy/deploytest; every translation case in pkg/controlplane.
func TestEnvoyAcceptsCLIOutput(t *testing.T) {
	cfg := cliConfig(t)
	body, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	named := strings.Replace(string(body), "{name: eastwest-b, address: 10.30.0.10, port: 15444}", "{name: eastwest-b, address: eastwest.mesh.example.internal, port: 15444}", 1)
	if named == string(body) {
		t.Fatal("config has no eastwest-b gateway to rename")
	}
	if err := os.WriteFile(cfg, []byte(named), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	out, stderr, err := run(t, "bootstrap", "--config", cfg)
	if err != nil {
		t.Fatalf("bootstrap: %v\n%s", err, stderr)
	}
	bootstrapPath := filepath.Join(dir, "bootstrap.json")
	if err := os.WriteFile(bootstrapPath, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := meshtest.EnvoyValidate(bootstrapPath, 2*time.Minute); err != nil {
		t.Error(err)
	}

	sds := filepath.Join(dir, "sds")
	out, stderr, err = run(t, "render", "--static", "--write-sds", "--sds-dir", sds, "--config", cfg)
	if err != nil {
		t.Fatalf("render --static: %v\n%s", err, stderr)
	}
	if !strings.Contains(out, "eastwest.mesh.example.internal") {
		t.Fatal("the static config does not resolve the named gateway itself")
	}
	staticPath := filepath.Join(dir, "static.json")
	if err := os.WriteFile(staticPath, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := meshtest.EnvoyValidate(staticPath, 2*time.Minute); err != nil {
		t.Error(err)
	}
}

// exitCode is the exit code of a finished command (0 for a nil error, -1 when it did not run).
func exitCode(err error) int {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	return -1
}

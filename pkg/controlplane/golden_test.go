package controlplane

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/google/go-cmp/cmp"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// The translation golden tests, in the manner of Envoy Gateway's: each testdata/in/NAME.yaml is
// a catalog with the options it is translated under; testdata/out holds what it gives, one file
// per xDS type (NAME.listeners.yaml, .routes.yaml, .clusters.yaml, .endpoints.yaml,
// .secrets.yaml), the services left out (NAME.skipped.yaml) or, for an input the catalog or
// translation refuses, the error (NAME.error.txt). A file is absent when its list is empty.
// pkg/dataplane's TestGoldenAccepted parses every one of these outputs, so the built-in data
// plane is held to accept all the control plane emits. Regenerate with make golden (-update)
// and review the diff.

var update = flag.Bool("update", false, "rewrite golden files in testdata/out")

// goldenKinds are the output files of a case besides .error.txt, in the order they are checked.
var goldenKinds = []string{"listeners", "routes", "clusters", "endpoints", "secrets", "skipped"}

// goldenInput is one testdata/in case: translation options and a catalog. Decoded strictly: a
// misspelt key fails the case rather than being ignored.
type goldenInput struct {
	ListenAddress  string         `yaml:"listenAddress"`
	AccessLog      *bool          `yaml:"accessLog"`
	ConnectTimeout *time.Duration `yaml:"connectTimeout"`
	Outlier        *goldenOutlier `yaml:"outlier"`
	Limits         struct {
		MaxRequestHeadersKB uint32 `yaml:"maxRequestHeadersKB"`
		MaxHeadersCount     uint32 `yaml:"maxHeadersCount"`
		MaxConnections      uint64 `yaml:"maxConnections"`
	} `yaml:"limits"`
	Gateways []struct {
		Name      string   `yaml:"name"`
		Network   string   `yaml:"network"`
		Addresses []string `yaml:"addresses"`
		Priority  uint32   `yaml:"priority"`
	} `yaml:"gateways"`
	// Reserved are catalog.Options.Reserved: the daemon's own ports.
	Reserved []struct {
		Port    uint32 `yaml:"port"`
		Field   string `yaml:"field"`
		Address string `yaml:"address"`
	} `yaml:"reserved"`
	// Unchecked decodes the catalog without the catalog's rules, as if it slipped past them, to
	// show what translation leaves out.
	Unchecked bool `yaml:"unchecked"`
	// Catalog is the catalog document; CatalogText is one given verbatim instead (for inputs
	// that are not a well-formed mapping). Either is loaded from a catalog.yaml next to Files.
	Catalog     yaml.Node `yaml:"catalog"`
	CatalogText *string   `yaml:"catalogText"`
	// Files are written next to the catalog, by name (e.g. a descriptor set that does not
	// parse); echo.pb, the Echo service's descriptor set (meshtest), is always there.
	Files map[string]string `yaml:"files"`
	// Secrets renders the SDS secrets too, of a placeholder identity (the private key redacted).
	Secrets bool `yaml:"secrets"`
	// PeerMetadata, when present, is Options.PeerMetadata.
	PeerMetadata *struct {
		WorkloadName      string `yaml:"workloadName"`
		Namespace         string `yaml:"namespace"`
		CanonicalService  string `yaml:"canonicalService"`
		CanonicalRevision string `yaml:"canonicalRevision"`
		App               string `yaml:"app"`
		Version           string `yaml:"version"`
		ClusterID         string `yaml:"clusterID"`
	} `yaml:"peerMetadata"`
	// Reverse, when present, is Options.Reverse: the inbound direction.
	Reverse *struct {
		Address        string        `yaml:"address"`
		Port           uint32        `yaml:"port"`
		TrustDomain    string        `yaml:"trustDomain"`
		ConnectTimeout time.Duration `yaml:"connectTimeout"`
		HealthCheck    struct {
			Interval           time.Duration `yaml:"interval"`
			Timeout            time.Duration `yaml:"timeout"`
			UnhealthyThreshold uint32        `yaml:"unhealthyThreshold"`
			HealthyThreshold   uint32        `yaml:"healthyThreshold"`
		} `yaml:"healthCheck"`
		Outlier  goldenOutlier `yaml:"outlier"`
		Services []struct {
			Host    string   `yaml:"host"`
			Aliases []string `yaml:"aliases"`
			Ports   []struct {
				Number          uint32           `yaml:"number"`
				TargetPort      uint32           `yaml:"targetPort"`
				Protocol        catalog.Protocol `yaml:"protocol"`
				HealthCheckPath string           `yaml:"healthCheckPath"`
			} `yaml:"ports"`
			Backends []struct {
				Host string `yaml:"host"`
				Port uint32 `yaml:"port"`
			} `yaml:"backends"`
			Principals []string `yaml:"principals"`
		} `yaml:"services"`
	} `yaml:"reverse"`
}

type goldenOutlier struct {
	ConsecutiveErrors  uint32        `yaml:"consecutiveErrors"`
	Interval           time.Duration `yaml:"interval"`
	BaseEjectionTime   time.Duration `yaml:"baseEjectionTime"`
	MaxEjectionPercent uint32        `yaml:"maxEjectionPercent"`
}

func (o goldenOutlier) options() Outlier {
	return Outlier(o)
}

// goldenCase is a loaded testdata/in case. Err is the catalog's refusal, if it refuses it.
type goldenCase struct {
	Catalog *catalog.Catalog
	Options Options
	Secrets bool
	Err     error
}

// loadGolden loads a case the catalog accepts.
func loadGolden(t testing.TB, path string) (*catalog.Catalog, Options) {
	t.Helper()
	c := loadCase(t, path)
	if c.Err != nil {
		t.Fatalf("%s: %v", path, c.Err)
	}
	return c.Catalog, c.Options
}

// validGoldenInputs are the cases the catalog and translation accept (those without an
// .error.txt output).
func validGoldenInputs(t testing.TB) []string {
	t.Helper()
	inputs, err := filepath.Glob("testdata/in/*.yaml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs (%v)", err)
	}
	var valid []string
	for _, in := range inputs {
		c := loadCase(t, in)
		if c.Err != nil {
			continue
		}
		if _, err := Translate(c.Catalog, c.Options); err == nil {
			valid = append(valid, in)
		}
	}
	return valid
}

func loadCase(t testing.TB, path string) goldenCase {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var in goldenInput
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&in); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	opts := Options{
		ListenAddress:  in.ListenAddress,
		ConnectTimeout: 5 * time.Second,
		Outlier:        Outlier{ConsecutiveErrors: 5, Interval: 10 * time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
		AccessLog:      in.AccessLog == nil || *in.AccessLog,
		Limits:         Limits{MaxRequestHeadersKB: in.Limits.MaxRequestHeadersKB, MaxHeadersCount: in.Limits.MaxHeadersCount, MaxConnections: in.Limits.MaxConnections},
	}
	if in.ConnectTimeout != nil {
		opts.ConnectTimeout = *in.ConnectTimeout
	}
	if in.Outlier != nil {
		opts.Outlier = in.Outlier.options()
	}
	if pm := in.PeerMetadata; pm != nil {
		opts.PeerMetadata = &PeerMetadata{WorkloadName: pm.WorkloadName, Namespace: pm.Namespace, CanonicalService: pm.CanonicalService,
			CanonicalRevision: pm.CanonicalRevision, App: pm.App, Version: pm.Version, ClusterID: pm.ClusterID}
	}
	var names []string
	for _, g := range in.Gateways {
		gw := Gateway{Name: g.Name, Network: g.Network, Priority: g.Priority}
		for _, a := range g.Addresses {
			gw.Addresses = append(gw.Addresses, netip.MustParseAddrPort(a))
		}
		opts.Gateways = append(opts.Gateways, gw)
		names = append(names, g.Name)
	}
	if r := in.Reverse; r != nil {
		rev := &Reverse{Address: r.Address, Port: r.Port, TrustDomain: r.TrustDomain, ConnectTimeout: r.ConnectTimeout,
			HealthCheck: HealthCheck{Interval: r.HealthCheck.Interval, Timeout: r.HealthCheck.Timeout,
				UnhealthyThreshold: r.HealthCheck.UnhealthyThreshold, HealthyThreshold: r.HealthCheck.HealthyThreshold},
			Outlier: r.Outlier.options()}
		for _, s := range r.Services {
			rs := ReverseService{Host: s.Host, Aliases: s.Aliases, Principals: s.Principals}
			for _, p := range s.Ports {
				rs.Ports = append(rs.Ports, ReversePort{Number: p.Number, TargetPort: p.TargetPort, Protocol: p.Protocol, HealthCheckPath: p.HealthCheckPath})
			}
			for _, b := range s.Backends {
				rs.Backends = append(rs.Backends, Backend{Host: b.Host, Port: b.Port})
			}
			rev.Services = append(rev.Services, rs)
		}
		opts.Reverse = rev
	}
	var catYAML []byte
	if in.CatalogText != nil {
		catYAML = []byte(*in.CatalogText)
	} else if catYAML, err = yaml.Marshal(&in.Catalog); err != nil {
		t.Fatal(err)
	}
	out := goldenCase{Options: opts, Secrets: in.Secrets}
	if in.Unchecked {
		cat := &catalog.Catalog{}
		if err := yaml.Unmarshal(catYAML, cat); err != nil {
			t.Fatal(err)
		}
		cat.Normalize()
		out.Catalog = cat
		return out
	}
	// catalog.Load, as for a catalog file on the instance: it reads the descriptor sets the
	// catalog names. Errors name the file by its base name, as if it were the current directory.
	dir := t.TempDir()
	echo, err := meshtest.EchoDescriptorSet()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"echo.pb": echo, "catalog.yaml": catYAML}
	for name, content := range in.Files {
		files[name] = []byte(content)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), content, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var reserved []catalog.ReservedPort
	for _, r := range in.Reserved {
		reserved = append(reserved, catalog.ReservedPort{Port: r.Port, Field: r.Field, Address: r.Address})
	}
	out.Catalog, err = catalog.Load(filepath.Join(dir, "catalog.yaml"), catalog.Options{Gateways: names, Reserved: reserved})
	if err != nil {
		out.Err = errors.New(strings.ReplaceAll(err.Error(), dir+string(filepath.Separator), ""))
	}
	return out
}

// goldenSecrets stand for the fleet's identity in rendered secrets: placeholders, not PEM (the
// private key is redacted anyway), so the output does not change from run to run.
func goldenSecrets() []*tlsv3.Secret {
	return RedactSecrets(Secrets(&identity.Bundle{
		CertChainPEM: []byte("[the fleet's certificate chain]"),
		KeyPEM:       []byte("[the fleet's private key]"),
		RootsPEM:     []byte("[the mesh's trust bundle]"),
	}))
}

// TestGolden pins the exact xDS resources for each testdata/in case (see the top of this file).
func TestGolden(t *testing.T) {
	inputs, _ := filepath.Glob("testdata/in/*.yaml")
	if len(inputs) == 0 {
		t.Fatal("no golden inputs")
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".yaml")
		t.Run(name, func(t *testing.T) {
			got, err := goldenOutputs(loadCase(t, in))
			if err != nil {
				t.Fatal(err)
			}
			for _, kind := range append(slices.Clone(goldenKinds), "error") {
				checkGoldenFile(t, filepath.Join("testdata/out", goldenFile(name, kind)), got[kind])
			}
		})
	}
	// Every file in testdata/out belongs to a case: an input renamed or removed takes its
	// outputs along.
	outs, _ := filepath.Glob("testdata/out/*")
	for _, out := range outs {
		name, ok := goldenCaseOf(filepath.Base(out))
		if _, err := os.Stat(filepath.Join("testdata/in", name+".yaml")); !ok || err != nil {
			if *update {
				if err := os.Remove(out); err != nil {
					t.Fatal(err)
				}
				continue
			}
			t.Errorf("%s belongs to no case in testdata/in; run make golden to remove it", out)
		}
	}
}

// goldenCaseOf is the case an output file belongs to, if it is named as one.
func goldenCaseOf(file string) (string, bool) {
	for _, kind := range append(slices.Clone(goldenKinds), "error") {
		if name, ok := strings.CutSuffix(file, goldenFile("", kind)); ok && name != "" {
			return name, true
		}
	}
	return "", false
}

// goldenFile is a case's output file of one kind.
func goldenFile(name, kind string) string {
	if kind == "error" {
		return name + ".error.txt"
	}
	return name + "." + kind + ".yaml"
}

// goldenOutputs are a case's output files by kind; a kind with nothing to show is absent.
func goldenOutputs(c goldenCase) (map[string][]byte, error) {
	out := map[string][]byte{}
	if c.Err != nil {
		// The protobuf module spaces its errors with a space or a no-break space at random, so
		// that no one depends on their text; the golden file has a space.
		out["error"] = []byte(strings.ReplaceAll(c.Err.Error(), "\u00a0", " ") + "\n")
		return out, nil
	}
	res, err := Translate(c.Catalog, c.Options)
	if err != nil {
		out["error"] = []byte(err.Error() + "\n")
		return out, nil
	}
	if _, err := NewSnapshot(res, nil); err != nil {
		return nil, fmt.Errorf("snapshot invalid: %v", err)
	}
	var secrets []*tlsv3.Secret
	if c.Secrets {
		secrets = goldenSecrets()
	}
	lists := map[string][]proto.Message{
		"listeners": messages(res.Listeners),
		"routes":    messages(res.Routes),
		"clusters":  messages(res.Clusters),
		"endpoints": messages(res.Endpoints),
		"secrets":   messages(secrets),
	}
	for kind, list := range lists {
		if len(list) == 0 {
			continue
		}
		if out[kind], err = resourcesYAML(list); err != nil {
			return nil, fmt.Errorf("%s: %v", kind, err)
		}
	}
	if len(res.Skipped) > 0 {
		j, err := json.Marshal(res.Skipped)
		if err != nil {
			return nil, err
		}
		if out["skipped"], err = jsonToYAML(j); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func messages[T proto.Message](list []T) []proto.Message {
	out := make([]proto.Message, len(list))
	for i, m := range list {
		out[i] = m
	}
	return out
}

// checkGoldenFile compares got with the file (nil: the file must not exist), or rewrites it
// with -update.
func checkGoldenFile(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if got == nil {
			if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	switch {
	case os.IsNotExist(err) && got == nil:
		return
	case os.IsNotExist(err):
		t.Errorf("%s is missing; the translation gives:\n%s\n(run make golden to write it)", path, got)
		return
	case err != nil:
		t.Fatal(err)
	case got == nil:
		t.Errorf("%s exists but the translation gives nothing of its kind (run make golden to remove it)", path)
		return
	}
	if diff := cmp.Diff(strings.Split(string(want), "\n"), strings.Split(string(got), "\n")); diff != "" {
		t.Errorf("%s differs from the translation (-file +translation); if intended, run make golden and review the diff:\n%s", path, diff)
	}
}

// resourcesYAML renders resources as a YAML list of their Envoy proto-JSON, in proto field order.
func resourcesYAML(list []proto.Message) ([]byte, error) {
	items := make([]json.RawMessage, 0, len(list))
	for _, m := range list {
		j, err := MarshalJSON(m)
		if err != nil {
			return nil, err
		}
		items = append(items, j)
	}
	j, err := json.Marshal(items)
	if err != nil {
		return nil, err
	}
	return jsonToYAML(j)
}

// jsonToYAML re-renders a JSON document as block-style YAML, keeping its key order; strings that
// would read as another type stay quoted.
func jsonToYAML(j []byte) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(j, &doc); err != nil {
		return nil, err
	}
	var plain func(n *yaml.Node)
	plain = func(n *yaml.Node) {
		n.Style = 0
		for _, c := range n.Content {
			plain(c)
		}
	}
	plain(&doc)
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// meshFixture is a daemon with the built-in data plane in front of a loopback stand-in for the
// mesh: one TLS endpoint (gateway and sidecar in one) presenting the identity of ns/sa/db, which
// requires a client certificate chaining to the mesh root and answers with its caller's ID.
type meshFixture struct {
	dir         string
	ca          *meshtest.CA
	leaf        *meshtest.Leaf
	cfg         *config.Config
	d           *Daemon
	logs        *meshtest.SyncBuffer
	goodPort    int // db.ns: its identity matches the mesh endpoint's certificate
	badPort     int // wrong.ns: expects another identity, so every handshake fails SAN checks
	metricsAddr string
}

func startMeshFixture(t *testing.T, identityTTL time.Duration) *meshFixture {
	t.Helper()
	return startMeshFixtureWith(t, identityTTL, nil)
}

// startMeshFixtureWith lets identity return the config's identity block (default: the files).
func startMeshFixtureWith(t *testing.T, identityTTL time.Duration, identity func(*meshFixture) string) *meshFixture {
	t.Helper()
	f := &meshFixture{dir: t.TempDir(), logs: &meshtest.SyncBuffer{}}
	var err error
	if f.ca, err = meshtest.NewCA("cluster.local"); err != nil {
		t.Fatal(err)
	}
	if f.leaf, err = f.ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", identityTTL); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := f.leaf.WriteFiles(f.dir, f.ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	srvLeaf, err := f.ca.IssueFor("spiffe://cluster.local/ns/ns/sa/db", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(srvLeaf.ChainPEM, srvLeaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(f.ca.Root)
	mesh, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mesh.Close() })
	go func() {
		for {
			c, err := mesh.Accept()
			if err != nil {
				return
			}
			go func() {
				tc := c.(*tls.Conn)
				_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
				if tc.Handshake() == nil {
					fmt.Fprintf(tc, "caller %s\n", tc.ConnectionState().PeerCertificates[0].URIs[0])
				}
				tc.Close()
			}()
		}
	}()
	f.goodPort, f.badPort = freePort(t), freePort(t)
	cat := fmt.Sprintf(`services:
  - host: db.ns.svc.cluster.local
    ports: [{number: %d, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/db]
  - host: wrong.ns.svc.cluster.local
    ports: [{number: %d, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/wrong]
`, f.goodPort, f.badPort)
	if err := os.WriteFile(filepath.Join(f.dir, "catalog.yaml"), []byte(cat), 0o644); err != nil {
		t.Fatal(err)
	}
	_, gwPort, _ := net.SplitHostPort(mesh.Addr().String())
	f.metricsAddr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	identityBlock := "  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}"
	if identity != nil {
		identityBlock = identity(f)
	}
	cfgText := fmt.Sprintf(`
node: {id: metrics-test}
gateways: [{name: gw, address: 127.0.0.1, port: %s}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
%s
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
`, gwPort, identityBlock, f.metricsAddr)
	cfgPath := filepath.Join(f.dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}
	if f.cfg, err = config.Load(cfgPath); err != nil {
		t.Fatal(err)
	}
	f.d = New(f.cfg, slog.New(slog.NewTextHandler(f.logs, nil)))
	runDaemon(t, f.d)
	return f
}

// dial connects to a service port and returns what the mesh answered ("" on failure).
func (f *meshFixture) dial(port int) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// scrape fetches and parses /metrics.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse as the Prometheus text format: %v", err)
	}
	return fams
}

// value returns the value of the series of family name whose labels include want.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	for _, m := range f.Metric {
		match := true
		for k, v := range want {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			match = match && found
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

func TestMetricsEndpoint(t *testing.T) {
	f := startMeshFixture(t, time.Hour)
	waitReady(t, f.metricsAddr, 200, "ready")

	// One connection through each service: one reaches the mesh, one fails its SAN check.
	eventually(t, "traffic through db.ns", func() bool {
		line, _ := f.dial(f.goodPort)
		return line == "caller spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy\n"
	})
	// A connection racing the data plane's first configuration may fail; from here on none may.
	goodCluster := controlplane.ClusterName(uint32(f.goodPort), "", "db.ns.svc.cluster.local")
	goodFailures, _ := value(scrape(t, f.metricsAddr), "fwdproxy_dataplane_tls_handshake_failures_total", map[string]string{"cluster": goodCluster})
	for range 3 {
		if line, err := f.dial(f.goodPort); line == "" {
			t.Fatalf("db.ns: %v", err)
		}
	}
	if line, _ := f.dial(f.badPort); line != "" {
		t.Fatalf("a service whose identity the mesh endpoint does not hold was reached: %q", line)
	}
	badCluster := controlplane.ClusterName(uint32(f.badPort), "", "wrong.ns.svc.cluster.local")

	var fams map[string]*dto.MetricFamily
	eventually(t, "handshake failure counted", func() bool {
		fams = scrape(t, f.metricsAddr)
		v, _ := value(fams, "fwdproxy_dataplane_tls_handshake_failures_total", map[string]string{"cluster": badCluster})
		return v >= 1
	})

	// Every family the daemon promises, with its type.
	want := map[string]dto.MetricType{
		"fwdproxy_xds_connected_clients":                  dto.MetricType_GAUGE,
		"fwdproxy_xds_pushes_total":                       dto.MetricType_COUNTER,
		"fwdproxy_snapshot_info":                          dto.MetricType_GAUGE,
		"fwdproxy_snapshot_updates_total":                 dto.MetricType_COUNTER,
		"fwdproxy_snapshot_last_update_timestamp_seconds": dto.MetricType_GAUGE,
		"fwdproxy_catalog_services":                       dto.MetricType_GAUGE,
		"fwdproxy_catalog_ports":                          dto.MetricType_GAUGE,
		"fwdproxy_config_build_errors_total":              dto.MetricType_COUNTER,
		"fwdproxy_identity_expiry_timestamp_seconds":      dto.MetricType_GAUGE,
		"fwdproxy_identity_rotations_total":               dto.MetricType_COUNTER,
		"fwdproxy_identity_rotation_errors_total":         dto.MetricType_COUNTER,
		"fwdproxy_identity_expired":                       dto.MetricType_GAUGE,
		"fwdproxy_dataplane_connections_total":            dto.MetricType_COUNTER,
		"fwdproxy_dataplane_connections_active":           dto.MetricType_GAUGE,
		"fwdproxy_dataplane_tls_handshake_failures_total": dto.MetricType_COUNTER,
		"fwdproxy_dataplane_upstream_errors_total":        dto.MetricType_COUNTER,
		"fwdproxy_dataplane_xds_connected":                dto.MetricType_GAUGE,
		"go_goroutines":                                   dto.MetricType_GAUGE,
		"process_start_time_seconds":                      dto.MetricType_GAUGE,
	}
	for name, typ := range want {
		fam, ok := fams[name]
		if !ok {
			t.Errorf("/metrics lacks %s", name)
			continue
		}
		if fam.GetType() != typ {
			t.Errorf("%s is a %s, want %s", name, fam.GetType(), typ)
		}
	}
	// Prometheus naming: counters end in _total, nothing else does; every family has help.
	for name, fam := range fams {
		if !strings.HasPrefix(name, "fwdproxy_") {
			continue
		}
		if (fam.GetType() == dto.MetricType_COUNTER) != strings.HasSuffix(name, "_total") {
			t.Errorf("%s: a %s, so it should %s end in _total", name, fam.GetType(), map[bool]string{true: "", false: "not"}[fam.GetType() == dto.MetricType_COUNTER])
		}
		if fam.GetHelp() == "" {
			t.Errorf("%s has no help text", name)
		}
	}
	// Gossip metrics belong to the fleet; when the daemon runs without peers they may be absent.
	for name := range fams {
		if strings.HasPrefix(name, "fwdproxy_gossip_") {
			t.Logf("gossip family present: %s", name)
		}
	}

	// A few values.
	checks := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"fwdproxy_catalog_services", nil, 2},
		{"fwdproxy_catalog_ports", nil, 2},
		{"fwdproxy_identity_expiry_timestamp_seconds", nil, float64(f.leaf.Cert.NotAfter.Unix())},
		{"fwdproxy_identity_expired", nil, 0},
		{"fwdproxy_identity_rotations_total", nil, 0},
		{"fwdproxy_config_build_errors_total", nil, 0},
		{"fwdproxy_xds_connected_clients", nil, 1}, // the built-in data plane's one ADS stream
		{"fwdproxy_dataplane_xds_connected", nil, 1},
		{"fwdproxy_xds_nacks_total", map[string]string{"type": "Cluster"}, 0},
	}
	for _, c := range checks {
		got, ok := value(fams, c.name, c.labels)
		if c.name == "fwdproxy_xds_nacks_total" && !ok {
			continue // a vector with no NACK yet exports no series
		}
		if !ok || got != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	cur := f.d.XDS.Current()
	if v, ok := value(fams, "fwdproxy_snapshot_info", map[string]string{"config_version": cur.ConfigVersion}); !ok || v != 1 {
		t.Errorf("fwdproxy_snapshot_info does not carry the served config version %s: %v", cur.ConfigVersion, fams["fwdproxy_snapshot_info"])
	}
	pushes := 0.0
	for _, m := range fams["fwdproxy_xds_pushes_total"].GetMetric() {
		pushes += m.Counter.GetValue()
	}
	if pushes < 4 { // at least listeners, clusters, endpoints and secrets
		t.Errorf("fwdproxy_xds_pushes_total sums to %v", pushes)
	}
	for _, l := range []int{f.goodPort, f.badPort} {
		if v, _ := value(fams, "fwdproxy_dataplane_connections_total", map[string]string{"listener": controlplane.ListenerName("127.0.0.1", uint32(l))}); v < 1 {
			t.Errorf("no connection counted on listener %d", l)
		}
	}
	if v, _ := value(fams, "fwdproxy_dataplane_tls_handshake_failures_total", map[string]string{"cluster": goodCluster}); v != goodFailures {
		t.Errorf("handshake failures counted on the good cluster: %v, before %v", v, goodFailures)
	}
	if v, ok := value(fams, "fwdproxy_dataplane_upstream_errors_total", map[string]string{"cluster": badCluster, "reason": "tls"}); !ok || v < 1 {
		t.Errorf("no upstream tls error counted on %s", badCluster)
	}
}

package daemon

import (
	"context"
	"errors"
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

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	status "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/dataplane"
)

const readyCatalog = `services:
  - host: reviews.bookinfo.svc.cluster.local
    ports: [{number: 9080, protocol: http}]
    identities: [spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews]
`

const readyCatalogChanged = readyCatalog + `  - host: mysql.bookinfo.svc.cluster.local
    ports: [{number: 3306, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/bookinfo/sa/mysql]
`

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// readyFixture writes an identity issued by an Istio-like CA, a catalog and a daemon config
// (with extra appended) into a new temporary directory, where the daemon's sockets go too.
func readyFixture(t *testing.T) (cfg *config.Config, catalogPath string) {
	return readyFixtureIn(t, t.TempDir(), "")
}

func readyFixtureIn(t *testing.T, dir, extra string) (cfg *config.Config, catalogPath string) {
	t.Helper()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chain, key, root, err := leaf.WriteFiles(dir, ca.RootPEM)
	if err != nil {
		t.Fatal(err)
	}
	catalogPath = filepath.Join(dir, "catalog.yaml")
	if err := os.WriteFile(catalogPath, []byte(readyCatalog), 0o644); err != nil {
		t.Fatal(err)
	}
	doc := fmt.Sprintf(`node: {id: ready-test}
gateways:
  - {name: eastwest, address: 127.0.0.1, port: 15443}
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: %q, privateKey: %q, roots: %q}
discovery:
  files: [catalog.yaml]
listen: {address: 127.0.0.1, accessLog: false}
dataplane: none  # the test's own ADS clients are the data planes
metrics: {address: %q}
%s`, chain, key, root, freeAddr(t), extra)
	if !strings.Contains(extra, "xds:") {
		doc += "xds: {socket: xds.sock}\n"
	}
	if !strings.Contains(extra, "admin:") {
		doc += "admin: {socket: admin.sock}\n"
	}
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err = config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return cfg, catalogPath
}

// getReady fetches /ready once.
func getReady(addr string) (int, string, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/ready")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// waitReady polls /ready until it answers code with a reason containing want, for at most 10s.
func waitReady(t *testing.T, addr string, code int, want string) {
	t.Helper()
	var got string
	var gotCode int
	for range 200 {
		c, body, err := getReady(addr)
		gotCode, got = c, body
		if err == nil && c == code && strings.Contains(body, want) {
			return
		}
		if err != nil {
			got = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("/ready: want %d %q, last answer %d %q", code, want, gotCode, got)
}

// adsClient is a minimal data plane: one SotW ADS stream asking for clusters and listeners, the
// two types readiness looks at, and answering every response with an ACK or a NACK.
type adsClient struct {
	stream discoverypb.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *core.Node
	acked  map[string]string // type URL -> last ACKed version
	nonces map[string]string // type URL -> nonce of the last response
	// sawSecrets: secrets come once per identity, not with every catalog change.
	sawSecrets bool
}

// dialADS connects to the daemon's xDS socket as node.
func dialADS(t *testing.T, ctx context.Context, cfg *config.Config, node string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient("unix:"+cfg.XDSSocket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var stream discoverypb.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	for range 100 { // the xDS listener may still be coming up
		stream, err = discoverypb.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	c := &adsClient{stream: stream, node: &core.Node{Id: node, Cluster: "fwdproxy"}, acked: map[string]string{}, nonces: map[string]string{}}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.SecretType} {
		if err := stream.Send(&discoverypb.DiscoveryRequest{Node: c.node, TypeUrl: typ}); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// answer receives one response and ACKs it (nack empty) or NACKs it with the given message.
func (c *adsClient) answer(nack string) (*discoverypb.DiscoveryResponse, error) {
	resp, err := c.stream.Recv()
	if err != nil {
		return nil, err
	}
	c.nonces[resp.GetTypeUrl()] = resp.GetNonce()
	req := &discoverypb.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce(), VersionInfo: c.acked[resp.GetTypeUrl()]}
	if nack != "" {
		req.ErrorDetail = &status.Status{Code: 3, Message: nack}
	} else {
		req.VersionInfo = resp.GetVersionInfo()
		c.acked[resp.GetTypeUrl()] = resp.GetVersionInfo()
	}
	return resp, c.stream.Send(req)
}

// answerBoth answers responses until clusters and listeners were each seen once, and the secrets
// if this client has not had them yet.
func (c *adsClient) answerBoth(t *testing.T, nack string) {
	t.Helper()
	seen := map[string]bool{resource.SecretType: c.sawSecrets}
	for range 10 {
		resp, err := c.answer(nack)
		if err != nil {
			t.Fatal(err)
		}
		seen[resp.GetTypeUrl()] = true
		c.sawSecrets = c.sawSecrets || resp.GetTypeUrl() == resource.SecretType
		if seen[resource.ClusterType] && seen[resource.ListenerType] && seen[resource.SecretType] {
			return
		}
	}
	t.Fatalf("no cluster and listener responses in 10 messages: %v", seen)
}

func TestReadyBeforeRun(t *testing.T) {
	cfg, _ := readyFixture(t)
	d := New(cfg, slog.New(slog.DiscardHandler))
	if ok, why := d.Ready(); ok || why != "no identity yet" {
		t.Fatalf("fresh daemon: Ready() = %v %q, want not ready: no identity yet", ok, why)
	}
	bundle, _, err := d.identitySource()
	if err != nil {
		t.Fatal(err)
	}
	d.SetIdentity(bundle)
	if ok, why := d.Ready(); ok || !strings.Contains(why, "catalog source file:") || !strings.Contains(why, "has not reported") {
		t.Fatalf("with identity only: Ready() = %v %q, want a catalog source that has not reported", ok, why)
	}
}

func TestReadyTransitions(t *testing.T) {
	cfg, catalogPath := readyFixture(t)
	var logs meshtest.SyncBuffer
	d := New(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("daemon did not stop within 10s")
		}
	})

	// Identity, catalog and snapshot are there, but nothing has taken the configuration.
	waitReady(t, cfg.Metrics.Address, http.StatusServiceUnavailable, "no data plane has acknowledged a configuration")
	if code, body, err := getHealthz(cfg.Metrics.Address); err != nil || code != http.StatusOK {
		t.Fatalf("/healthz while not ready: %d %q %v; liveness must not follow readiness", code, body, err)
	}

	// A data plane that rejects the configuration does not make the instance ready.
	sctx, stop := context.WithCancel(ctx)
	nacker := dialADS(t, sctx, cfg, cfg.Node.ID)
	nacker.answerBoth(t, "listener rejected by test")
	meshtest.Eventually(t, 10*time.Second, "the NACK counted", func() bool {
		v, _ := value(scrape(t, cfg.Metrics.Address), "fwdproxy_xds_nacks_total", map[string]string{"type": "listener"})
		return v >= 1
	})
	waitReady(t, cfg.Metrics.Address, http.StatusServiceUnavailable, "no data plane has acknowledged a configuration")
	stop()

	// The data plane (the node ID of Envoy's bootstrap, on the daemon's socket) ACKs clusters,
	// listeners and secrets: ready.
	client := dialADS(t, ctx, cfg, cfg.Node.ID)
	client.answerBoth(t, "")
	waitReady(t, cfg.Metrics.Address, http.StatusOK, "ready")
	if st := d.XDS.Status(); st.AckedCurrent != 1 {
		t.Fatalf("xDS status %+v: want exactly one client on the current configuration", st)
	}

	// A catalog change publishes a new snapshot; once the data plane ACKs it, ready again on the
	// new version.
	before := d.XDS.Current().ConfigVersion
	if err := os.WriteFile(catalogPath, []byte(readyCatalogChanged), 0o644); err != nil {
		t.Fatal(err)
	}
	client.answerBoth(t, "")
	waitReady(t, cfg.Metrics.Address, http.StatusOK, "ready")
	if after := d.XDS.Current().ConfigVersion; after == before {
		t.Fatalf("config version still %s after a catalog change", after)
	}

	// The data plane rejects the next configuration: it keeps serving the one it accepted, so
	// the instance stays in the load balancer, saying why.
	acked := d.XDS.Current().ConfigVersion
	if err := os.WriteFile(catalogPath, []byte(readyCatalog), 0o644); err != nil {
		t.Fatal(err)
	}
	client.answerBoth(t, "listener rejected by test")
	waitReady(t, cfg.Metrics.Address, http.StatusOK, "ready on an earlier configuration")
	if st := d.XDS.Status(); st.AckedCurrent != 0 || st.AckedAny != 1 || d.XDS.Current().ConfigVersion == acked {
		t.Fatalf("after a NACK: status %+v, version %s (acked %s)", st, d.XDS.Current().ConfigVersion, acked)
	}

	// A bad catalog edit is rejected; the last good configuration keeps serving and stays ready.
	if err := os.WriteFile(catalogPath, []byte("services: [{host: \"\"}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	meshtest.Eventually(t, 10*time.Second, "the bad edit rejected", func() bool {
		return strings.Contains(logs.String(), "catalog file rejected; still serving the last good catalog")
	})
	waitReady(t, cfg.Metrics.Address, http.StatusOK, "ready")

	// The data plane goes away: not ready.
	if err := client.stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for range 100 {
		if _, err := client.stream.Recv(); err != nil {
			break
		}
	}
	waitReady(t, cfg.Metrics.Address, http.StatusServiceUnavailable, "no data plane has acknowledged a configuration")
}

func getHealthz(addr string) (int, string, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/healthz")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// TestReadyIgnoresOtherClients: only the data plane the daemon configured counts for readiness
// and the NACK alert. Any other xDS client (here one with another node ID on the socket) is
// served, but its ACKs do not make the instance ready, and its NACKs do not raise
// fwdproxy_xds_nacks_total: they are counted in fwdproxy_xds_foreign_nacks_total.
func TestReadyIgnoresOtherClients(t *testing.T) {
	cfg, _ := readyFixture(t)
	d := New(cfg, slog.New(slog.DiscardHandler))
	runDaemon(t, d)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	waitReady(t, cfg.Metrics.Address, http.StatusServiceUnavailable, "no data plane has acknowledged a configuration")

	other := dialADS(t, ctx, cfg, "someone-else")
	other.answerBoth(t, "")
	// Its NACK is not this instance's problem either. Sent on the same stream, it is handled after
	// the ACKs: once it is counted, so were they.
	lt := resource.ListenerType
	if err := other.stream.Send(&discoverypb.DiscoveryRequest{Node: other.node, TypeUrl: lt, ResponseNonce: other.nonces[lt],
		VersionInfo: other.acked[lt], ErrorDetail: &status.Status{Code: 3, Message: "listener rejected by someone else"}}); err != nil {
		t.Fatal(err)
	}
	metric := func(name string) string {
		resp, err := http.Get("http://" + cfg.Metrics.Address + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, name+`{type="listener"} `) {
				return strings.TrimPrefix(l, name+`{type="listener"} `)
			}
		}
		return "missing"
	}
	meshtest.Eventually(t, 5*time.Second, "the foreign NACK counted", func() bool { return metric("fwdproxy_xds_foreign_nacks_total") == "1" })
	waitReady(t, cfg.Metrics.Address, http.StatusServiceUnavailable, "no data plane has acknowledged a configuration")
	if st := d.XDS.Status(); st.Clients != 1 || st.AckedAny != 0 {
		t.Fatalf("status %+v: another node's ACK counted", st)
	}
	if n := metric("fwdproxy_xds_nacks_total"); n != "0" {
		t.Fatalf("fwdproxy_xds_nacks_total{type=listener} = %s after another client's NACK", n)
	}

	// The data plane itself.
	dp := dialADS(t, ctx, cfg, cfg.Node.ID)
	dp.answerBoth(t, "")
	waitReady(t, cfg.Metrics.Address, http.StatusOK, "ready")
}

// The built-in data plane cannot receive a newer configuration (its message limit is lowered
// here; the control plane never builds a response over the real one): it keeps serving the one
// it has, so the instance stays ready on it the whole time, while the data plane reconnects and
// fails again. A fleet whose peers all hit the same configuration must not all leave the load
// balancer at once.
func TestReadyWhileTheBuiltinCannotTakeANewConfiguration(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	writeFleetIdentity(t, ca, dir, time.Hour)
	catalogPath := filepath.Join(dir, "catalog.yaml")
	tcp := fmt.Sprintf("  - host: db.ns.svc.cluster.local\n    ports: [{number: %d, protocol: tcp}]\n    identities: [spiffe://cluster.local/ns/ns/sa/db]\n", freePort(t))
	if err := os.WriteFile(catalogPath, []byte("services:\n"+tcp), 0o644); err != nil {
		t.Fatal(err)
	}
	metrics := freeAddr(t)
	cfgText := fmt.Sprintf(`node: {id: big-test}
gateways: [{name: gw, address: 127.0.0.1, port: 15443}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: %q}
admin: {socket: admin.sock}
builtin: {drainTime: 1s}
`, metrics)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	d := New(cfg, slog.New(slog.DiscardHandler))
	d.tuneDataplane = func(o *dataplane.Options) { o.MaxMessageBytes = 64 << 10; o.MaxBackoff = 300 * time.Millisecond }
	runDaemon(t, d)
	waitReady(t, metrics, http.StatusOK, "ready")

	// 400 HTTP services: about 200 KB of clusters, over the lowered limit.
	var big strings.Builder
	big.WriteString("services:\n" + tcp)
	httpPort := freePort(t)
	for i := range 400 {
		fmt.Fprintf(&big, "  - host: svc-%03d.ns.svc.cluster.local\n    ports: [{number: %d, protocol: http}]\n    identities: [spiffe://cluster.local/ns/ns/sa/svc]\n", i, httpPort)
	}
	if err := os.WriteFile(catalogPath, []byte(big.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// Across several failed attempts (each one a closed stream and a reconnect), every answer is
	// 200, on the earlier configuration.
	failures := func() float64 {
		v, _ := value(scrape(t, metrics), "fwdproxy_dataplane_xds_receive_errors_total", map[string]string{"reason": "too_large"})
		return v
	}
	for i := 0; failures() < 4; i++ {
		if i == 1000 {
			t.Fatalf("the data plane did not fail to receive the large configuration 4 times (%v)", failures())
		}
		code, body, err := getReady(metrics)
		if err != nil || code != http.StatusOK {
			t.Fatalf("/ready while the data plane keeps its last configuration: %d %q %v", code, body, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitReady(t, metrics, http.StatusOK, "ready on an earlier configuration")
}

package deploytest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// envoyInstance is Envoy run as the machine image runs it (fwdproxy-envoy.service): the bootstrap
// `fwdproxy bootstrap` renders, with images/packer/files/envoy-stats.yaml merged in by
// --config-yaml, configured over ADS and SDS by the daemon's xDS server, in front of a stand-in
// mesh (an AUTO_PASSTHROUGH gateway and sidecars). Only the addresses differ from an instance:
// everything listens on loopback, on free ports.
type envoyInstance struct {
	statsAddr, adminAddr string
	httpPort, tcpPort    int
	log                  *meshtest.SyncBuffer
	xds                  *controlplane.Server
}

// Stand-in services: reviews (HTTP) and mysql (TCP) are served by sidecars with the identity the
// catalog names. The others fail the three ways an upstream mTLS connection fails: ratings'
// sidecar presents another identity (SAN check), details' is issued by another mesh's CA (chain
// check), and the gateway knows no route for productpage (it closes the connection during the
// handshake, as AUTO_PASSTHROUGH does for an unknown SNI).
const (
	reviewsHost     = "reviews.bookinfo.svc.cluster.local"
	ratingsHost     = "ratings.bookinfo.svc.cluster.local"
	detailsHost     = "details.bookinfo.svc.cluster.local"
	productpageHost = "productpage.bookinfo.svc.cluster.local"
	mysqlHost       = "mysql.bookinfo.svc.cluster.local"
)

func freePort(t *testing.T) int {
	t.Helper()
	p, err := meshtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func startEnvoyInstance(t *testing.T) *envoyInstance {
	t.Helper()
	bin, err := meshtest.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	id := func(sa string) string { return "spiffe://cluster.local/ns/bookinfo/sa/" + sa }
	gw, err := meshtest.StartGateway("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Close() })
	otherMesh, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	e := &envoyInstance{httpPort: freePort(t), tcpPort: freePort(t), log: &meshtest.SyncBuffer{}}
	for _, s := range []struct {
		host, sa, proto string
		ca              *meshtest.CA
		port            int
	}{
		{reviewsHost, "reviews", meshtest.HTTP, ca, e.httpPort},
		{ratingsHost, "not-ratings", meshtest.HTTP, ca, e.httpPort},
		{detailsHost, "details", meshtest.HTTP, otherMesh, e.httpPort},
		{mysqlHost, "mysql", meshtest.TCP, ca, e.tcpPort},
	} {
		sc, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: s.host, SPIFFEID: id(s.sa), CA: s.ca, Protocol: s.proto})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sc.Close() })
		gw.Route(meshtest.Target{Host: s.host, Port: uint32(s.port)}, sc.Addr())
	}

	cat := &catalog.Catalog{Services: []catalog.Service{
		{Host: reviewsHost, Ports: []catalog.Port{{Number: uint32(e.httpPort), Protocol: catalog.HTTP}}, Identities: []string{id("reviews")}, AllowedClients: []string{"127.0.0.0/8"}},
		{Host: ratingsHost, Ports: []catalog.Port{{Number: uint32(e.httpPort), Protocol: catalog.HTTP}}, Identities: []string{id("ratings")}},
		{Host: detailsHost, Ports: []catalog.Port{{Number: uint32(e.httpPort), Protocol: catalog.HTTP}}, Identities: []string{id("details")}},
		{Host: productpageHost, Ports: []catalog.Port{{Number: uint32(e.httpPort), Protocol: catalog.HTTP}}, Identities: []string{id("productpage")}},
		{Host: mysqlHost, Ports: []catalog.Port{{Number: uint32(e.tcpPort), Protocol: catalog.TCP}}, Identities: []string{id("mysql")}, AllowedClients: []string{"127.0.0.1/32"}},
	}}
	cat.Normalize()
	gwAddr, err := netip.ParseAddrPort(gw.Addr())
	if err != nil {
		t.Fatal(err)
	}
	res, err := controlplane.Translate(cat, controlplane.Options{
		ListenAddress: "127.0.0.1", ConnectTimeout: 2 * time.Second, AccessLog: true,
		Outlier:  controlplane.Outlier{ConsecutiveErrors: 5, Interval: 10 * time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
		Gateways: []controlplane.Gateway{{Name: "eastwest", Addresses: []netip.AddrPort{gwAddr}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := identity.New("spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy", leaf.ChainPEM, leaf.KeyPEM, ca.RootPEM, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	snap, err := controlplane.NewSnapshot(res, bundle)
	if err != nil {
		t.Fatal(err)
	}
	e.xds = controlplane.NewServer(slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err := e.xds.Set(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "xds.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = e.xds.ServeUnix(ctx, lis, localsock.Policy{UID: uint32(os.Geteuid()), GID: -1, Field: "xds.group"})
	}()
	t.Cleanup(func() { cancel(); <-served })

	e.adminAddr = "127.0.0.1:" + strconv.Itoa(freePort(t))
	b, err := controlplane.Bootstrap(controlplane.BootstrapOptions{NodeID: "i-0123", NodeCluster: "fwdproxy", XDSSocket: sock, AdminAddress: e.adminAddr})
	if err != nil {
		t.Fatal(err)
	}
	j, err := controlplane.MarshalJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bootstrapPath := filepath.Join(dir, "bootstrap.json")
	if err := os.WriteFile(bootstrapPath, j, 0o644); err != nil {
		t.Fatal(err)
	}
	e.statsAddr = "127.0.0.1:" + strconv.Itoa(freePort(t))
	frag := statsFragment(t, e.statsAddr, e.adminAddr)

	cmd := exec.Command(bin, "-c", bootstrapPath, "--config-yaml", frag, "--disable-hot-restart", "--concurrency", "1", "--log-level", "warning")
	cmd.Stdout, cmd.Stderr = io.Discard, e.log // stdout: access logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("envoy exited: %v\n%s", err, e.log.String())
		default:
		}
		st := e.xds.Status()
		m, err := e.scrape()
		// The catalog's two listeners (HTTP and TCP port) and the stats listener.
		if st.AckedCurrent == 1 && err == nil && m.value("envoy_listener_manager_total_listeners_active", nil) == 2+1 {
			return e
		}
		if time.Now().After(deadline) {
			t.Fatalf("Envoy did not serve the catalog within 60s: xDS %+v, stats: %v, %v active listeners\n%s", st, err, m.value("envoy_listener_manager_total_listeners_active", nil), e.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// statsFragment is envoy-stats.yaml as installed, with its two addresses moved to the test's.
func statsFragment(t *testing.T, statsAddr, adminAddr string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(packerFiles, "envoy-stats.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	sh, sp, err := net.SplitHostPort(statsAddr)
	if err != nil {
		t.Fatal(err)
	}
	ah, ap, err := net.SplitHostPort(adminAddr)
	if err != nil {
		t.Fatal(err)
	}
	frag := string(raw)
	for _, r := range [][2]string{
		{"{address: 0.0.0.0, port_value: 15090}", "{address: " + sh + ", port_value: " + sp + "}"},
		{"{address: 127.0.0.1, port_value: 15000}", "{address: " + ah + ", port_value: " + ap + "}"},
	} {
		if strings.Count(frag, r[0]) != 1 {
			t.Fatalf("envoy-stats.yaml: expected %q exactly once", r[0])
		}
		frag = strings.Replace(frag, r[0], r[1], 1)
	}
	return frag
}

// metrics is a parsed Prometheus text exposition: series by metric name.
type metrics map[string][]map[string]string

var sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$`)
var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func parseExposition(body string) (metrics, error) {
	m := metrics{}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		g := sampleLine.FindStringSubmatch(line)
		if g == nil {
			return nil, fmt.Errorf("not a sample: %q", line)
		}
		labels := map[string]string{"__value__": g[3]}
		for _, p := range labelPair.FindAllStringSubmatch(g[2], -1) {
			labels[p[1]] = p[2]
		}
		m[g[1]] = append(m[g[1]], labels)
	}
	return m, sc.Err()
}

// value sums the series of name whose labels include match.
func (m metrics) value(name string, match map[string]string) float64 {
	var sum float64
series:
	for _, s := range m[name] {
		for k, v := range match {
			if s[k] != v {
				continue series
			}
		}
		f, _ := strconv.ParseFloat(s["__value__"], 64)
		sum += f
	}
	return sum
}

func (e *envoyInstance) scrape() (metrics, error) {
	resp, err := http.Get("http://" + e.statsAddr + "/stats/prometheus")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /stats/prometheus: %d %v", resp.StatusCode, err)
	}
	return parseExposition(string(body))
}

// traffic sends what makes the statistics the dashboards and alerts read move: three HTTP
// requests that reach reviews (200), one to each service whose upstream mTLS fails (503), and a
// TCP connection to mysql.
func (e *envoyInstance) traffic(t *testing.T) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	get := func(host string) int {
		req, err := http.NewRequest(http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(e.httpPort)+"/", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s through Envoy: %v", host, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for range 3 {
		if code := get(reviewsHost); code != http.StatusOK {
			t.Fatalf("GET %s through Envoy: %d, want 200\n%s", reviewsHost, code, e.log.String())
		}
	}
	for _, h := range []string{ratingsHost, detailsHost, productpageHost} {
		if code := get(h); code != http.StatusServiceUnavailable {
			t.Fatalf("GET %s (failing upstream mTLS) through Envoy: %d, want 503", h, code)
		}
	}
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(e.tcpPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || !strings.Contains(line, mysqlHost) {
		t.Fatalf("TCP through Envoy: %q, %v", line, err)
	}
	// A client outside the allowed clients matches no filter chain and is closed.
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	if c, err := d.Dial("tcp", "127.0.0.1:"+strconv.Itoa(e.tcpPort)); err == nil {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if b, _ := io.ReadAll(c); len(b) > 0 {
			t.Errorf("TCP from a refused client through Envoy: got %q", b)
		}
		c.Close()
	}
}

// TestEnvoyStatsListenerServesOnlyStats runs the stats listener for real: it serves Envoy's
// Prometheus stats and nothing else of the admin API, and Envoy accepts and uses everything the
// daemon serves over ADS without a warning (deprecated fields are logged at warning level).
func TestEnvoyStatsListenerServesOnlyStats(t *testing.T) {
	e := startEnvoyInstance(t)
	e.traffic(t)
	m, err := e.scrape()
	if err != nil {
		t.Fatal(err)
	}
	if m.value("envoy_server_live", nil) != 1 {
		t.Errorf("envoy_server_live = %v through the stats listener", m.value("envoy_server_live", nil))
	}
	for _, req := range []struct{ method, path string }{
		{http.MethodGet, "/stats"}, {http.MethodGet, "/config_dump"}, {http.MethodPost, "/quitquitquit"},
		{http.MethodPost, "/drain_listeners"}, {http.MethodGet, "/stats/prometheus/../../config_dump"},
	} {
		r, err := http.NewRequest(req.method, "http://"+e.statsAddr+req.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s %s on the stats listener: %d, want 404 (only /stats/prometheus is exposed)", req.method, req.path, resp.StatusCode)
		}
	}
	if st := e.xds.Status(); st.AckedCurrent != 1 {
		t.Errorf("Envoy did not acknowledge the current configuration: %+v", st)
	}
	for _, line := range strings.Split(e.log.String(), "\n") {
		if strings.TrimSpace(line) != "" {
			t.Errorf("envoy logged: %s", line)
		}
	}
}

// histogramBase is the histogram a series name belongs to, or the name itself.
func histogramBase(name string) string {
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if b, ok := strings.CutSuffix(name, suffix); ok {
			return b
		}
	}
	return name
}

// has reports whether Envoy exports name, a histogram by its base name included.
func (m metrics) has(name string) bool {
	return len(m[name]) > 0 || len(m[name+"_bucket"]) > 0
}

// labelNames are the label names of name's series (a histogram's buckets for its base name).
func (m metrics) labelNames(name string) map[string]bool {
	out := map[string]bool{}
	for _, n := range []string{name, name + "_bucket"} {
		for _, s := range m[n] {
			for k := range s {
				out[k] = true
			}
		}
	}
	return out
}

// targetLabels are added by Prometheus's scrape configuration, not by Envoy.
var targetLabels = map[string]bool{"job": true, "instance": true, "fleet": true, "zone": true}

// envoyKeepRegexp is the fwdproxy-envoy job's metric_relabel_configs keep rule, anchored as
// Prometheus anchors it, and the job's scrape parameters.
func envoyKeepRegexp(t *testing.T) (*regexp.Regexp, map[string][]string) {
	t.Helper()
	raw, err := os.ReadFile(promConfig)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName        string              `yaml:"job_name"`
			Params         map[string][]string `yaml:"params"`
			MetricRelabels []struct {
				SourceLabels []string `yaml:"source_labels"`
				Regex        string   `yaml:"regex"`
				Action       string   `yaml:"action"`
			} `yaml:"metric_relabel_configs"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	for _, sc := range cfg.ScrapeConfigs {
		if sc.JobName != "fwdproxy-envoy" {
			continue
		}
		for _, r := range sc.MetricRelabels {
			if r.Action == "keep" && len(r.SourceLabels) == 1 && r.SourceLabels[0] == "__name__" {
				return regexp.MustCompile("^(?:" + r.Regex + ")$"), sc.Params
			}
		}
		t.Fatal("the fwdproxy-envoy job has no keep rule on __name__")
	}
	t.Fatal("prometheus.yml has no fwdproxy-envoy job")
	return nil, nil
}

// TestEnvoyMetricsAreReal checks the observability files against the statistics Envoy exports,
// run as the image runs it, after traffic that works and traffic that fails each way an
// upstream mTLS connection fails:
//   - every Envoy metric a dashboard or rule queries, and every one in envoyStats, exists, with
//     every label the query selects or groups by;
//   - the labels carry the names the translation gives (cluster stat names, outbound_PORT);
//   - the Envoy alerts' inputs move for the failure each alert is for, and only for it;
//   - Prometheus keeps exactly the Envoy metrics that are queried, and the stats listener serves
//     the usedonly view the scrape asks for.
func TestEnvoyMetricsAreReal(t *testing.T) {
	e := startEnvoyInstance(t)
	e.traffic(t)
	m, err := e.scrape()
	if err != nil {
		t.Fatal(err)
	}

	for _, name := range envoyStats {
		if !m.has(name) {
			t.Errorf("envoyStats lists %s, which Envoy does not export", name)
		}
	}
	used := map[string]bool{}
	for _, q := range allQueries(t) {
		names, err := queryMetrics(q.expr)
		if err != nil {
			t.Fatalf("%s: %v", q.where, err)
		}
		labelsOnEnvoy := map[string]bool{}
		var envoyNames []string
		for _, n := range names {
			if !strings.HasPrefix(n, "envoy_") {
				continue
			}
			used[n] = true
			envoyNames = append(envoyNames, n)
			if !m.has(histogramBase(n)) && !m.has(n) {
				t.Errorf("%s: Envoy exports no %s", q.where, n)
			}
			for l := range m.labelNames(histogramBase(n)) {
				labelsOnEnvoy[l] = true
			}
			for l := range m.labelNames(n) {
				labelsOnEnvoy[l] = true
			}
		}
		if len(envoyNames) == 0 {
			continue
		}
		lbls, _ := queryLabels(q.expr)
		for _, l := range lbls {
			if !targetLabels[l] && !labelsOnEnvoy[l] {
				t.Errorf("%s: Envoy's %v have no label %s", q.where, envoyNames, l)
			}
		}
	}

	// The label values are the translation's names.
	cluster := func(host string, port int) string {
		return controlplane.ClusterStatName(controlplane.ClusterName(uint32(port), "", host))
	}
	for _, c := range []string{cluster(reviewsHost, e.httpPort), cluster(mysqlHost, e.tcpPort)} {
		if m.value("envoy_cluster_membership_healthy", map[string]string{"envoy_cluster_name": c}) != 1 {
			t.Errorf("no envoy_cluster_membership_healthy{envoy_cluster_name=%q} = 1", c)
		}
	}
	// The bootstrap's stats matcher keeps a cluster's statistics an operator reads and drops the
	// rest (bytes, buffers, pools...), except the xDS cluster's; everything outside cluster.* stays.
	series := func(name, c string) int {
		n := 0
		for _, s := range m[name] {
			if s["envoy_cluster_name"] == c {
				n++
			}
		}
		return n
	}
	reviews := cluster(reviewsHost, e.httpPort)
	if series("envoy_cluster_upstream_cx_total", reviews) != 1 || series("envoy_cluster_upstream_rq_xx", reviews) == 0 {
		t.Errorf("the stats matcher drops %s's upstream_cx_total or upstream_rq_xx", reviews)
	}
	if n := series("envoy_cluster_upstream_cx_rx_bytes_total", reviews); n != 0 {
		t.Errorf("the stats matcher keeps %s's upstream_cx_rx_bytes_total", reviews)
	}
	if series("envoy_cluster_upstream_cx_rx_bytes_total", controlplane.XDSClusterName) != 1 {
		t.Errorf("the stats matcher drops the xDS cluster's upstream_cx_rx_bytes_total")
	}
	for _, name := range []string{"envoy_cluster_manager_cds_update_success", "envoy_listener_manager_lds_update_success", "envoy_server_uptime"} {
		if !m.has(name) {
			t.Errorf("the stats matcher drops %s", name)
		}
	}

	// Envoy flushes its statistics only when asked for them (the bootstrap's stats_flush_on_admin):
	// a scrape starts the merge of the workers' histograms, which the next scrape shows. So the
	// histograms must move within a few scrapes, or the dashboards' latencies never would.
	rqTime := func(m metrics) float64 {
		return m.value("envoy_cluster_upstream_rq_time_count", map[string]string{"envoy_cluster_name": cluster(reviewsHost, e.httpPort)})
	}
	for n, seen := 0, m; rqTime(seen) != 3; n++ {
		if n == 20 {
			t.Fatalf("envoy_cluster_upstream_rq_time_count{envoy_cluster_name=%q} = %v after %d scrapes, not the 3 requests answered", cluster(reviewsHost, e.httpPort), rqTime(seen), n)
		}
		time.Sleep(50 * time.Millisecond)
		if seen, err = e.scrape(); err != nil {
			t.Fatal(err)
		}
	}
	if m.value("envoy_http_downstream_rq_total", map[string]string{"envoy_http_conn_manager_prefix": controlplane.StatPrefix(uint32(e.httpPort))}) != 6 {
		t.Errorf("envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix=%q} is not the 6 requests sent", controlplane.StatPrefix(uint32(e.httpPort)))
	}
	if n := m.value("envoy_listener_no_filter_chain_match", map[string]string{"envoy_listener_address": controlplane.ListenerName("127.0.0.1", uint32(e.tcpPort))}); n != 1 {
		t.Errorf("envoy_listener_no_filter_chain_match{envoy_listener_address=%q} = %v, not the 1 refused client", controlplane.ListenerName("127.0.0.1", uint32(e.tcpPort)), n)
	}
	if m.value("envoy_tcp_downstream_cx_total", map[string]string{"envoy_tcp_prefix": controlplane.StatPrefix(uint32(e.tcpPort))}) != 1 {
		t.Errorf("envoy_tcp_downstream_cx_total{envoy_tcp_prefix=%q} is not the 1 connection made", controlplane.StatPrefix(uint32(e.tcpPort)))
	}

	// Each Envoy alert's inputs move for its failure: the handshake alert's for the wrong
	// identity and the foreign chain, the connect alert's (not explained by a handshake failure)
	// for the SNI the gateway does not route; none for the service that works.
	rules := map[string]string{}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			rules[r.Alert] = r.Expr
		}
	}
	sum := func(alert, prefix, c string) float64 {
		names, err := queryMetrics(rules[alert])
		if err != nil || len(names) == 0 {
			t.Fatalf("alert %s: %v %v", alert, names, err)
		}
		var v float64
		for _, n := range names {
			if strings.HasPrefix(n, prefix) {
				v += m.value(n, map[string]string{"envoy_cluster_name": c})
			}
		}
		return v
	}
	for host, want := range map[string][2]bool{ // handshake alert's input, connect alert's input
		ratingsHost:     {true, false},
		detailsHost:     {true, false},
		productpageHost: {false, true},
		reviewsHost:     {false, false},
	} {
		c := cluster(host, e.httpPort)
		handshake := sum("FwdproxyEnvoyUpstreamHandshakeFailures", "envoy_cluster_ssl_", c) > 0
		connect := sum("FwdproxyEnvoyUpstreamConnectFailures", "envoy_cluster_upstream_cx_connect_fail", c) > 0 && !handshake
		if handshake != want[0] || connect != want[1] {
			t.Errorf("%s: handshake-failure input moved: %v, connect-failure input (not a handshake failure) moved: %v; want %v", host, handshake, connect, want)
		}
	}
	if names, _ := queryMetrics(rules["FwdproxyEnvoyNoHealthyUpstream"]); len(names) != 1 || !m.has(names[0]) {
		t.Errorf("FwdproxyEnvoyNoHealthyUpstream reads %v", names)
	}

	// Prometheus keeps what is queried, and nothing else.
	keep, params := envoyKeepRegexp(t)
	for n := range used {
		if !keep.MatchString(n) {
			t.Errorf("prometheus.yml drops %s, which a dashboard or rule queries", n)
		}
	}
	for n := range m {
		if keep.MatchString(n) && !used[n] {
			t.Errorf("prometheus.yml keeps %s, which nothing queries", n)
		}
	}
	if _, ok := params["usedonly"]; !ok {
		t.Error("the fwdproxy-envoy job does not scrape with usedonly")
	}
	resp, err := http.Get("http://" + e.statsAddr + "/stats/prometheus?usedonly=")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	usedOnly, err := parseExposition(string(body))
	if err != nil || resp.StatusCode != http.StatusOK || len(usedOnly) == 0 || len(usedOnly) >= len(m) {
		t.Fatalf("GET /stats/prometheus?usedonly= on the stats listener: %d, %d of %d metrics, %v", resp.StatusCode, len(usedOnly), len(m), err)
	}
	if usedOnly.value("envoy_http_downstream_rq_total", map[string]string{"envoy_http_conn_manager_prefix": controlplane.StatPrefix(uint32(e.httpPort))}) != 6 {
		t.Error("usedonly leaves out the requests made")
	}

	// The scrape exactly as the job makes it (usedonly and Envoy's filter) has every series the
	// keep list keeps from the usedonly view (the same labels; the scrapes move some values), and
	// little else.
	q := url.Values{}
	for k, vs := range params {
		for _, v := range vs {
			q.Add(k, v)
		}
	}
	resp, err = http.Get("http://" + e.statsAddr + "/stats/prometheus?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	scraped, err := parseExposition(string(body))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /stats/prometheus with the job's params %v: %d, %v", q, resp.StatusCode, err)
	}
	kept := 0
	for n, series := range usedOnly {
		if !keep.MatchString(n) {
			continue
		}
		kept++
		if got, want := seriesLabels(scraped[n]), seriesLabels(series); !slices.Equal(got, want) {
			t.Errorf("the job's filter changes %s's series: %v, without it %v", n, got, want)
		}
	}
	if kept == 0 || len(scraped) > kept+len(scraped)/2 {
		t.Errorf("the job's scrape has %d metrics, of which the keep list keeps %d: the filter lets through what is dropped anyway", len(scraped), kept)
	}
}

// seriesLabels are the series' label sets without their values, sorted.
func seriesLabels(series []map[string]string) []string {
	var out []string
	for _, s := range series {
		l := maps.Clone(s)
		delete(l, "__value__")
		out = append(out, fmt.Sprint(l))
	}
	slices.Sort(out)
	return out
}

package deploytest

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/prometheus/model/labels"
	promparser "github.com/prometheus/prometheus/promql/parser"
)

// daemonMetrics is the authoritative list of the metrics the fwdproxy daemon exports. A query
// may use only these; each one used must also be defined in the Go sources (checked below).
var daemonMetrics = []string{
	"fwdproxy_xds_connected_clients",
	"fwdproxy_xds_pushes_total",
	"fwdproxy_xds_nacks_total",
	"fwdproxy_xds_foreign_nacks_total",
	"fwdproxy_xds_resources_sent_total",
	"fwdproxy_snapshot_info",
	"fwdproxy_snapshot_updates_total",
	"fwdproxy_snapshot_last_update_timestamp_seconds",
	"fwdproxy_catalog_services",
	"fwdproxy_catalog_ports",
	"fwdproxy_config_build_errors_total",
	"fwdproxy_translation_services_skipped",
	"fwdproxy_identity_expiry_timestamp_seconds",
	"fwdproxy_identity_rotations_total",
	"fwdproxy_identity_rotation_errors_total",
	"fwdproxy_identity_expired",
	"fwdproxy_discovery_sync_errors_total",
	"fwdproxy_discovery_last_success_timestamp_seconds",
	"fwdproxy_discovery_connected",
	"fwdproxy_discovery_connected_since_timestamp_seconds",
	"fwdproxy_discovery_services_skipped",
	"fwdproxy_gossip_members",
	"fwdproxy_gossip_health_score",
	"fwdproxy_gossip_converged",
	"fwdproxy_gossip_store_entries",
	"fwdproxy_gossip_messages_rejected_total",
	"fwdproxy_gossip_member_states",
	"fwdproxy_gossip_synced",
	"fwdproxy_gossip_isolated",
	"fwdproxy_gossip_partition_suspected",
	"fwdproxy_gossip_state_bytes",
	"fwdproxy_fleet_leader",
	"fwdproxy_dataplane_connections_active",
	"fwdproxy_dataplane_connections_total",
	"fwdproxy_dataplane_requests_total",
	"fwdproxy_dataplane_upstream_errors_total",
	"fwdproxy_dataplane_tls_handshake_failures_total",
	"fwdproxy_dataplane_rbac_denied_total",
	"fwdproxy_dataplane_ejections_total",
	"fwdproxy_dataplane_connections_refused_total",
	"fwdproxy_dataplane_downstream_errors_total",
	"fwdproxy_dataplane_xds_receive_errors_total",
	"fwdproxy_dataplane_xds_connected",
	"fwdproxy_dataplane_xds_rejected_total",
	"fwdproxy_dataplane_reverse_requests_total",
	"fwdproxy_dataplane_reverse_connections_total",
	"fwdproxy_admin_requests_refused_total",
}

// envoyStats are the Envoy statistics the dashboards and alerts may use, as Envoy's
// /stats/prometheus names them: prefix envoy_, the cluster's stat name (alt_stat_name), the
// listener's address or the connection manager's / TCP proxy's stat prefix moved into the
// envoy_cluster_name, envoy_listener_address, envoy_http_conn_manager_prefix or envoy_tcp_prefix
// label, dots to underscores; histograms by their base name. Each is checked against what Envoy
// itself exports, run as the image runs it (TestEnvoyMetricsAreReal).
var envoyStats = []string{
	"envoy_cluster_upstream_cx_connect_fail",
	"envoy_cluster_upstream_rq_xx",
	"envoy_cluster_upstream_rq_time",
	"envoy_cluster_ssl_connection_error",
	"envoy_cluster_ssl_fail_verify_san",
	"envoy_cluster_ssl_fail_verify_error",
	"envoy_cluster_ssl_fail_verify_no_cert",
	"envoy_cluster_outlier_detection_ejections_active",
	"envoy_cluster_membership_healthy",
	"envoy_cluster_membership_total",
	"envoy_listener_downstream_cx_active",
	"envoy_http_downstream_rq_total",
	"envoy_http_downstream_rq_xx",
	"envoy_http_rbac_denied",
	"envoy_tcp_downstream_cx_total",
	"envoy_listener_no_filter_chain_match",
	"envoy_server_memory_allocated",
}

// prometheusSynthetic are series Prometheus itself writes for every scrape target.
var prometheusSynthetic = []string{"up", "scrape_duration_seconds", "scrape_samples_scraped"}

// standardCollectorMetrics gathers the names client_golang's Go and process collectors export;
// the daemon registers both (pkg/daemon).
func standardCollectorMetrics(t *testing.T) []string {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		out = append(out, mf.GetName())
	}
	return out
}

// goMetricNames collects the fwdproxy_* metric names defined in the repository's Go code (tests
// and this folder excluded): string literals, and Namespace/Subsystem/Name option literals.
func goMetricNames(t *testing.T) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	metricName := regexp.MustCompile(`^fwdproxy_[a-z0-9_]+$`)
	fset := token.NewFileSet()
	err := filepath.WalkDir(repoRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", "testdata", "vendor", "node_modules", "deploy":
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.BasicLit:
				if s, err := strconv.Unquote(n.Value); err == nil && n.Kind == token.STRING && metricName.MatchString(s) {
					names[s] = true
				}
			case *ast.CompositeLit:
				parts := map[string]string{}
				for _, e := range n.Elts {
					kv, ok := e.(*ast.KeyValueExpr)
					if !ok {
						continue
					}
					k, ok1 := kv.Key.(*ast.Ident)
					v, ok2 := kv.Value.(*ast.BasicLit)
					if ok1 && ok2 && v.Kind == token.STRING {
						parts[k.Name], _ = strconv.Unquote(v.Value)
					}
				}
				if parts["Name"] != "" && parts["Namespace"] != "" {
					names[prometheus.BuildFQName(parts["Namespace"], parts["Subsystem"], parts["Name"])] = true
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// grafanaVars replaces Grafana's variables with values PromQL accepts, for parsing.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "1h")

// queryMetrics returns the metric names an expression selects. A selector may name several
// metrics by a __name__ regular expression of the form prefix_(a|b|c) (alternatives of plain
// names), which is expanded into them.
func queryMetrics(expr string) ([]string, error) {
	e, err := promparser.NewParser(promparser.Options{}).ParseExpr(grafanaVars.Replace(expr))
	if err != nil {
		return nil, err
	}
	var out []string
	var bad error
	promparser.Inspect(e, func(n promparser.Node, _ []promparser.Node) error {
		if vs, ok := n.(*promparser.VectorSelector); ok {
			names := []string{vs.Name}
			for _, m := range vs.LabelMatchers {
				if m.Name != "__name__" {
					continue
				}
				switch m.Type {
				case labels.MatchEqual:
					names = []string{m.Value}
				case labels.MatchRegexp:
					names, err = expandNameRegexp(m.Value)
					if err != nil {
						bad = err
					}
				default:
					bad = fmt.Errorf("__name__%s%q: select metrics by name or a regular expression of names", m.Type, m.Value)
				}
			}
			out = append(out, names...)
		}
		return nil
	})
	return out, bad
}

// nameAlternatives matches prefix(a|b|c)suffix with plain metric-name characters only.
var nameAlternatives = regexp.MustCompile(`^([a-zA-Z0-9_:]*)\(([a-zA-Z0-9_:|]+)\)([a-zA-Z0-9_:]*)$`)

func expandNameRegexp(re string) ([]string, error) {
	g := nameAlternatives.FindStringSubmatch(re)
	if g == nil {
		return nil, fmt.Errorf("__name__=~%q: only prefix_(a|b|c) alternatives of metric names are understood here", re)
	}
	var out []string
	for _, alt := range strings.Split(g[2], "|") {
		out = append(out, g[1]+alt+g[3])
	}
	return out, nil
}

// queryLabels returns the label names an expression selects on, groups by or matches on.
func queryLabels(expr string) ([]string, error) {
	e, err := promparser.NewParser(promparser.Options{}).ParseExpr(grafanaVars.Replace(expr))
	if err != nil {
		return nil, err
	}
	var out []string
	promparser.Inspect(e, func(n promparser.Node, _ []promparser.Node) error {
		switch n := n.(type) {
		case *promparser.VectorSelector:
			for _, m := range n.LabelMatchers {
				if m.Name != "__name__" {
					out = append(out, m.Name)
				}
			}
		case *promparser.AggregateExpr:
			out = append(out, n.Grouping...)
		case *promparser.BinaryExpr:
			if n.VectorMatching != nil {
				out = append(out, n.VectorMatching.MatchingLabels...)
				out = append(out, n.VectorMatching.Include...)
			}
		}
		return nil
	})
	return out, nil
}

// labelValuesSelector extracts the series selector of a Grafana label_values(SELECTOR, label)
// query.
var labelValuesSelector = regexp.MustCompile(`^label_values\((.+),\s*[a-zA-Z_]+\)$`)

// query is one PromQL expression of an alert rule, a dashboard panel or a dashboard variable.
type query struct{ where, expr string }

// allQueries gathers every PromQL expression of the alert rules and the dashboards.
func allQueries(t *testing.T) []query {
	t.Helper()
	var queries []query
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			queries = append(queries, query{rulesFile + ": " + r.Alert + r.Record, r.Expr})
		}
	}
	for path, d := range loadDashboards(t) {
		for _, p := range allPanels(d.Panels) {
			for _, tg := range p.Targets {
				queries = append(queries, query{path + ": panel " + p.Title, tg.Expr})
			}
		}
		for _, v := range d.Templating.List {
			q, ok := v.Query.(map[string]any)
			if !ok {
				continue
			}
			s, _ := q["query"].(string)
			if m := labelValuesSelector.FindStringSubmatch(s); m != nil {
				queries = append(queries, query{path + ": variable " + v.Name, m[1]})
			}
		}
	}
	return queries
}

// TestQueriedMetricsExist: every metric a dashboard or alert rule queries exists. fwdproxy_*
// names must be in the daemon's list AND defined in the Go code; envoy_* names in the documented
// Envoy list (histogram series by their base name); go_* and process_* among what the standard
// collectors export; nothing else but Prometheus's own series.
func TestQueriedMetricsExist(t *testing.T) {
	queries := allQueries(t)
	if len(queries) < 20 {
		t.Fatalf("only %d queries found", len(queries))
	}

	inGo := goMetricNames(t)
	standard := standardCollectorMetrics(t)
	used := map[string]bool{}
	for _, q := range queries {
		names, err := queryMetrics(q.expr)
		if err != nil {
			t.Errorf("%s: %q does not parse: %v", q.where, q.expr, err)
			continue
		}
		if len(names) == 0 {
			t.Errorf("%s: %q selects no metric", q.where, q.expr)
		}
		for _, name := range names {
			used[name] = true
			switch {
			case strings.HasPrefix(name, "fwdproxy_"):
				if !slices.Contains(daemonMetrics, name) {
					t.Errorf("%s: %s is not a metric the daemon exports", q.where, name)
				} else if !inGo[name] {
					t.Errorf("%s: %s is defined nowhere in the Go code", q.where, name)
				}
			case strings.HasPrefix(name, "envoy_"):
				base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
				if !slices.Contains(envoyStats, name) && !slices.Contains(envoyStats, base) {
					t.Errorf("%s: %s is not in the documented Envoy statistics", q.where, name)
				}
			case strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_"):
				if !slices.Contains(standard, name) {
					t.Errorf("%s: %s is not exported by the Go or process collector", q.where, name)
				}
			case slices.Contains(prometheusSynthetic, name):
			default:
				t.Errorf("%s: %s is not a metric of the daemon, Envoy or Prometheus", q.where, name)
			}
		}
	}
	// The fleet's key signals are on the dashboard or in the alerts.
	for _, want := range []string{"fwdproxy_gossip_converged", "fwdproxy_identity_expiry_timestamp_seconds", "fwdproxy_xds_nacks_total", "fwdproxy_snapshot_info",
		"envoy_cluster_ssl_fail_verify_san", "envoy_cluster_ssl_fail_verify_error", "envoy_cluster_ssl_connection_error", "envoy_cluster_upstream_cx_connect_fail",
		"envoy_cluster_membership_healthy", "envoy_http_downstream_rq_total", "envoy_tcp_downstream_cx_total"} {
		if !used[want] {
			t.Errorf("%s is not queried anywhere", want)
		}
	}
}

// TestMetricScanner checks the Go scanner itself on the daemon's package: the metrics it
// registers are found, so a missing name is reported for the right reason.
func TestMetricScanner(t *testing.T) {
	inGo := goMetricNames(t)
	for _, name := range []string{"fwdproxy_catalog_services", "fwdproxy_xds_nacks_total", "fwdproxy_identity_expiry_timestamp_seconds"} {
		if !inGo[name] {
			t.Errorf("scanner did not find %s in the Go code", name)
		}
	}
	if inGo["fwdproxy_no_such_metric"] {
		t.Error("scanner found a name that is not in the code")
	}
	names, err := queryMetrics(`sum by (x) (rate(a_total{b="c"}[$__rate_interval])) / on() group_left {__name__="d"} + {__name__=~"e_(f|g)_h"}`)
	if err != nil || !slices.Equal(names, []string{"a_total", "d", "e_f_h", "e_g_h"}) {
		t.Errorf("queryMetrics = %v, %v; want [a_total d e_f_h e_g_h]", names, err)
	}
	if _, err := queryMetrics(`{__name__=~"envoy_.*"}`); err == nil {
		t.Error("queryMetrics accepted a __name__ pattern it cannot expand into names")
	}
	lbls, err := queryLabels(`sum by (x) (rate(a_total{b="c"}[5m])) / on (y) group_left (z) d`)
	if slices.Sort(lbls); err != nil || !slices.Equal(lbls, []string{"b", "x", "y", "z"}) {
		t.Errorf("queryLabels = %v, %v; want [b x y z]", lbls, err)
	}
}

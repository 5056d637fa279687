package deploytest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

var (
	rulesFile     = filepath.Join(obsDir, "prometheus", "rules", "fwdproxy.rules.yml")
	ruleTestsFile = filepath.Join(obsDir, "prometheus", "tests", "fwdproxy.rules.test.yml")
	promConfig    = filepath.Join(obsDir, "prometheus", "prometheus.yml")
	dashboardDir  = filepath.Join(obsDir, "grafana")
)

func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found: install Debian's %q package (apt-get install -y %s), which ships /usr/bin/promtool", promtoolPk, promtoolPk)
	}
	return p
}

// TestPromtool: the rules pass `promtool check rules` and their unit tests `promtool test rules`;
// the scrape configuration passes `promtool check config`.
func TestPromtool(t *testing.T) {
	pt := promtool(t)
	for _, args := range [][]string{
		{"check", "rules", rulesFile},
		{"test", "rules", ruleTestsFile},
		{"check", "config", promConfig},
	} {
		out, err := exec.Command(pt, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	raw, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(raw, &rf); err != nil {
		t.Fatal(err)
	}
	return rf
}

// TestAlertRules: every alert has a severity and a summary and description, the alerts the fleet
// needs exist, and each alert is exercised by the promtool unit tests.
func TestAlertRules(t *testing.T) {
	rf := loadRules(t)
	raw, err := os.ReadFile(ruleTestsFile)
	if err != nil {
		t.Fatal(err)
	}
	var tests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(raw, &tests); err != nil {
		t.Fatal(err)
	}
	firing := map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				firing[a.Alertname] = true
			}
		}
	}
	var alerts []string
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts = append(alerts, r.Alert)
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("alert %s: severity %q, want warning or critical", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s needs summary and description annotations", r.Alert)
			}
			if !firing[r.Alert] {
				t.Errorf("alert %s has no promtool test in which it fires", r.Alert)
			}
		}
	}
	// The conditions the fleet must page on: identity expiring, gossip not converged, discovery
	// failing, NACKs, upstream handshake failures, Envoy without a healthy upstream.
	for _, want := range []string{"FwdproxyIdentityExpiring", "FwdproxyGossipNotConverged", "FwdproxyDiscoveryFailing", "FwdproxyXDSNacks", "FwdproxyUpstreamHandshakeFailures",
		"FwdproxyEnvoyUpstreamHandshakeFailures", "FwdproxyEnvoyUpstreamConnectFailures", "FwdproxyEnvoyNoHealthyUpstream"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("no alert %s", want)
		}
	}
}

type dashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Schema     int    `json:"schemaVersion"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []panel `json:"panels"`
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

func loadDashboards(t *testing.T) map[string]dashboard {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dashboardDir, "*.json"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no dashboards in %s (%v)", dashboardDir, err)
	}
	out := map[string]dashboard{}
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var d dashboard
		if err := json.Unmarshal(raw, &d); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		out[p] = d
	}
	return out
}

// allPanels flattens rows.
func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

// TestDashboards: the Grafana dashboards parse and follow a current Grafana's schema: uid,
// title, templating for the data source and the instance, unique panel ids, every query panel
// on the templated data source with at least one expression.
func TestDashboards(t *testing.T) {
	uids := map[string]bool{}
	for path, d := range loadDashboards(t) {
		if d.UID == "" || d.Title == "" || d.Schema < 36 {
			t.Errorf("%s: uid %q, title %q, schemaVersion %d: want all set, schema >= 36", path, d.UID, d.Title, d.Schema)
		}
		if uids[d.UID] {
			t.Errorf("%s: uid %q used twice", path, d.UID)
		}
		uids[d.UID] = true
		vars := map[string]string{}
		for _, v := range d.Templating.List {
			vars[v.Name] = v.Type
		}
		if vars["datasource"] != "datasource" || vars["instance"] != "query" {
			t.Errorf("%s: templating %v: want a datasource variable named datasource and a query variable named instance", path, vars)
		}
		ids := map[int]bool{}
		queries := 0
		for _, p := range allPanels(d.Panels) {
			if ids[p.ID] {
				t.Errorf("%s: panel id %d used twice", path, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("%s: panel %q does not fit the 24-column grid", path, p.Title)
			}
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("%s: panel %q does not use the ${datasource} variable", path, p.Title)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: panel %q has no targets", path, p.Title)
			}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("%s: panel %q target %s has no expr", path, p.Title, tg.RefID)
				}
				queries++
			}
		}
		if queries < 10 {
			t.Errorf("%s: only %d queries", path, queries)
		}
	}
}

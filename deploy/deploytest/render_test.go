package deploytest

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/ext/tryfunc"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"
	"github.com/zclconf/go-cty/cty/function"
	"github.com/zclconf/go-cty/cty/function/stdlib"
	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
)

// evalContext offers the Terraform functions the module's locals and template use. yamlencode
// is stood in for by JSON encoding (JSON is YAML), which is enough to check what the daemon reads.
func evalContext(dir string, vars map[string]cty.Value) *hcl.EvalContext {
	str := func(impl func(string) (string, error)) function.Function {
		return function.New(&function.Spec{
			Params: []function.Parameter{{Name: "s", Type: cty.String}},
			Type:   function.StaticReturnType(cty.String),
			Impl: func(args []cty.Value, _ cty.Type) (cty.Value, error) {
				out, err := impl(args[0].AsString())
				return cty.StringVal(out), err
			},
		})
	}
	return &hcl.EvalContext{
		Variables: map[string]cty.Value{
			"var":  cty.ObjectVal(vars),
			"path": cty.ObjectVal(map[string]cty.Value{"module": cty.StringVal(dir)}),
		},
		Functions: map[string]function.Function{
			"merge":        stdlib.MergeFunc,
			"concat":       stdlib.ConcatFunc,
			"join":         stdlib.JoinFunc,
			"try":          tryfunc.TryFunc,
			"yamlencode":   stdlib.JSONEncodeFunc,
			"coalescelist": stdlib.CoalesceListFunc,
			"base64encode": str(func(s string) (string, error) { return base64.StdEncoding.EncodeToString([]byte(s)), nil }),
			"file": str(func(p string) (string, error) {
				b, err := os.ReadFile(p)
				return string(b), err
			}),
		},
	}
}

func eval(t *testing.T, what string, e hcl.Expression, ctx *hcl.EvalContext) cty.Value {
	t.Helper()
	v, diags := e.Value(ctx)
	if diags.HasErrors() {
		t.Fatalf("%s: %s", what, diags.Error())
	}
	return v
}

// TestRenderedConfig evaluates the module's locals and cloud-init template with the worked
// example's inputs, and checks that the daemon accepts the configuration the instances get, that
// the catalog parses, and that every catalog port has an NLB listener.
func TestRenderedConfig(t *testing.T) {
	exampleDir := filepath.Join(asgDir, "examples", "complete")
	ex := loadModule(t, exampleDir, ".tf")
	call := ex.find(t, "module", "fwdproxy")
	exCtx := evalContext(exampleDir, map[string]cty.Value{
		"ami_id":                    cty.StringVal("ami-0123456789abcdef0"),
		"acm_pca_arn":               cty.StringVal("arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9"),
		"gossip_keyring_secret_arn": cty.StringVal("arn:aws:secretsmanager:eu-west-1:111122223333:secret:fwdproxy-gossip-AbCdEf"),
	})
	m := loadModule(t, asgDir, ".tf")
	vars := map[string]cty.Value{}
	for _, v := range m.all("variable") {
		name := v.Labels[0]
		if a, ok := call.Body.Attributes[name]; ok {
			vars[name] = eval(t, "example "+name, a.Expr, exCtx)
		} else if d, ok := v.Body.Attributes["default"]; ok {
			vars[name] = eval(t, "default of "+name, d.Expr, nil)
		}
	}
	ctx := evalContext(asgDir, vars)
	localExpr := func(name string) hcl.Expression {
		for _, b := range m.all("locals") {
			if a, ok := b.Body.Attributes[name]; ok {
				return a.Expr
			}
		}
		t.Fatalf("no local %s", name)
		return nil
	}
	cfgVal := eval(t, "local.fwdproxy_config", localExpr("fwdproxy_config"), ctx)
	units := eval(t, "local.units", localExpr("units"), ctx)
	configYAML := eval(t, "yamlencode", &hclsyntax.FunctionCallExpr{Name: "yamlencode", Args: []hclsyntax.Expression{&hclsyntax.LiteralValueExpr{Val: cfgVal}}}, ctx).AsString()

	// The cloud-init template, rendered as templatefile() would.
	tmplPath := filepath.Join(asgDir, "templates", "cloud-init.yaml.tftpl")
	src, err := os.ReadFile(tmplPath)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, diags := hclsyntax.ParseTemplate(src, tmplPath, hcl.InitialPos)
	if diags.HasErrors() {
		t.Fatal(diags.Error())
	}
	ctx.Variables = map[string]cty.Value{
		"config_yaml":         cty.StringVal(configYAML),
		"catalog_yaml":        vars["catalog_yaml"],
		"asg_name":            vars["name"],
		"lifecycle_hook_name": cty.StringVal(vars["name"].AsString() + "-terminate"),
		"units":               units,
		"region":              cty.StringVal("eu-west-1"),
		"gossip_keyring_arn":  vars["gossip_keyring_secret_arn"],
	}
	userData := eval(t, tmplPath, tmpl, ctx).AsString()

	var cloudInit struct {
		WriteFiles []struct {
			Path, Owner, Permissions, Encoding, Content string
		} `yaml:"write_files"`
		Runcmd [][]string `yaml:"runcmd"`
	}
	if err := yaml.Unmarshal([]byte(userData), &cloudInit); err != nil {
		t.Fatalf("user data is not YAML: %v\n%s", err, userData)
	}
	files := map[string]string{}
	for _, f := range cloudInit.WriteFiles {
		content := f.Content
		if f.Encoding == "b64" {
			b, err := base64.StdEncoding.DecodeString(content)
			if err != nil {
				t.Fatalf("%s: %v", f.Path, err)
			}
			content = string(b)
		}
		files[f.Path] = content
		if f.Path != "/etc/fwdproxy/lifecycle.env" && (f.Owner != "root:fwdproxy" || f.Permissions != "0640") {
			t.Errorf("%s: owner %s mode %s, want root:fwdproxy 0640", f.Path, f.Owner, f.Permissions)
		}
	}
	if want := "ASG_NAME=fwdproxy\nLIFECYCLE_HOOK_NAME=fwdproxy-terminate\n"; files["/etc/fwdproxy/lifecycle.env"] != want {
		t.Errorf("lifecycle.env = %q, want %q", files["/etc/fwdproxy/lifecycle.env"], want)
	}
	// First the gossip keyring, then the units (which read it).
	if len(cloudInit.Runcmd) != 2 || !strings.Contains(strings.Join(cloudInit.Runcmd[0], " "), "secretsmanager get-secret-value --region eu-west-1 --secret-id 'arn:aws:secretsmanager:eu-west-1:111122223333:secret:fwdproxy-gossip-AbCdEf'") ||
		!strings.Contains(strings.Join(cloudInit.Runcmd[0], " "), "umask 077") || !strings.Contains(strings.Join(cloudInit.Runcmd[0], " "), "mv /etc/fwdproxy/gossip.keys.tmp /etc/fwdproxy/gossip.keys") {
		t.Errorf("runcmd %v does not first fetch the gossip keyring into a 0600 file", cloudInit.Runcmd)
	} else if start := cloudInit.Runcmd[1]; !slices.Contains(start, "fwdproxy-envoy.service") || !slices.Contains(start, "fwdproxy.service") {
		t.Errorf("runcmd %v does not start the daemon and Envoy", cloudInit.Runcmd)
	} else if !slices.Contains(start, "--no-block") {
		t.Errorf("runcmd %v waits for the units inside cloud-final.service; use --no-block", cloudInit.Runcmd)
	}

	// What the daemon reads.
	cfg, err := config.Parse("/etc/fwdproxy/config.yaml", []byte(files["/etc/fwdproxy/config.yaml"]))
	if err != nil {
		t.Fatalf("the daemon rejects the rendered config: %v\n%s", err, files["/etc/fwdproxy/config.yaml"])
	}
	if cfg.Metrics.Address != "0.0.0.0:9102" || cfg.Peers.Bind != "0.0.0.0:7946" || cfg.Dataplane != "none" || cfg.Envoy.AdminAddress != "127.0.0.1:15000" {
		t.Errorf("rendered config: metrics %q, peers.bind %q, dataplane %q, envoy admin %q", cfg.Metrics.Address, cfg.Peers.Bind, cfg.Dataplane, cfg.Envoy.AdminAddress)
	}
	// The daemon's sockets are where its unit creates the runtime directory, and belong to the
	// groups the image creates and the daemon's unit joins: Envoy's group and the operators'.
	daemonUnit, envoyUnit := unit(t, "fwdproxy.service"), unit(t, "fwdproxy-envoy.service")
	for _, s := range []struct{ field, path, group string }{{"xds", cfg.XDSSocket(), cfg.XDS.Group}, {"admin", cfg.AdminSocket(), cfg.Admin.Group}} {
		if rd := daemonUnit["RuntimeDirectory"]; len(rd) != 1 || filepath.Dir(s.path) != "/run/"+rd[0] {
			t.Errorf("%s.socket %s is not in the daemon unit's RuntimeDirectory=%v", s.field, s.path, rd)
		}
		if !slices.Contains(strings.Fields(strings.Join(daemonUnit["SupplementaryGroups"], " ")), s.group) {
			t.Errorf("%s.group %q: the daemon's unit is not in it (SupplementaryGroups=%v), so it cannot give the socket to it", s.field, s.group, daemonUnit["SupplementaryGroups"])
		}
	}
	if g := envoyUnit["Group"]; len(g) != 1 || g[0] != cfg.XDS.Group {
		t.Errorf("xds.group %q, but Envoy's unit runs as Group=%v: Envoy could not connect to the xDS socket", cfg.XDS.Group, g)
	}
	if cfg.XDS.Address != "" || cfg.Admin.Address != "" {
		t.Errorf("rendered config turns TCP on: xds.address %q, admin.address %q", cfg.XDS.Address, cfg.Admin.Address)
	}
	if cfg.Peers.Keyring != "/etc/fwdproxy/gossip.keys" || cfg.Peers.AWS == nil || cfg.Peers.AWS.AutoScalingGroup != vars["name"].AsString() {
		t.Errorf("rendered peers %+v: want the fetched keyring and this group's instances as peers", cfg.Peers)
	}
	if cfg.Identity.ACMPCA == nil || cfg.Identity.ACMPCA.CertificateAuthorityARN != vars["acm_pca_arn"].AsString() {
		t.Errorf("rendered identity %+v does not use the module's CA", cfg.Identity)
	}
	if !slices.Equal(cfg.Discovery.Files, []string{"catalog.yaml"}) {
		t.Errorf("discovery.files %v, want [catalog.yaml]", cfg.Discovery.Files)
	}
	cat, err := catalog.Parse(cfg.Path("catalog.yaml"), []byte(files["/etc/fwdproxy/catalog.yaml"]), cfg.CatalogOptions())
	if err != nil {
		t.Fatalf("the rendered catalog does not parse: %v", err)
	}
	if len(cat.Services) == 0 {
		t.Fatal("the rendered catalog has no services")
	}
	var listeners []int64
	for _, p := range vars["listener_ports"].AsValueSlice() {
		n, _ := p.GetAttr("port").AsBigFloat().Int64()
		listeners = append(listeners, n)
	}
	for _, s := range cat.Services {
		for _, p := range s.Ports {
			if !slices.Contains(listeners, int64(p.Number)) {
				t.Errorf("catalog port %d of %s has no NLB listener in the example's listener_ports %v", p.Number, s.Host, listeners)
			}
		}
	}
}

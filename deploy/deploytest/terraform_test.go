package deploytest

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"
)

// TestTerraformDocumented: every variable has a type and a description, every output a
// description, the README lists each of them, and versions.tf pins the AWS provider to 5.x.
func TestTerraformDocumented(t *testing.T) {
	m := loadModule(t, asgDir, ".tf")
	readme, err := os.ReadFile(filepath.Join(asgDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	vars := m.all("variable")
	if len(vars) < 10 {
		t.Fatalf("only %d variables in %s", len(vars), asgDir)
	}
	for _, kind := range []string{"variable", "output"} {
		for _, b := range m.all(kind) {
			name := b.Labels[0]
			d, ok := b.Body.Attributes["description"]
			if !ok {
				t.Errorf("%s %q has no description", kind, name)
				continue
			}
			if v, diags := d.Expr.Value(nil); diags.HasErrors() || v.Type() != cty.String || len(strings.TrimSpace(v.AsString())) < 15 {
				t.Errorf("%s %q: description must be a sentence", kind, name)
			}
			if _, ok := b.Body.Attributes["type"]; kind == "variable" && !ok {
				t.Errorf("variable %q has no type", name)
			}
			if !strings.Contains(string(readme), "`"+name+"`") {
				t.Errorf("%s %q is not documented in %s/README.md (write it as `%s`)", kind, name, asgDir, name)
			}
		}
	}

	tf := m.find(t, "terraform")
	aws := literal(t, nested(t, tf, "required_providers"), "aws")
	if src := aws.GetAttr("source").AsString(); src != "hashicorp/aws" {
		t.Errorf("aws provider source %q, want hashicorp/aws", src)
	}
	if v := aws.GetAttr("version").AsString(); !regexp.MustCompile(`^~> 5\.\d+$`).MatchString(v) {
		t.Errorf("aws provider version %q, want ~> 5.x", v)
	}
}

// TestTerraformReferences: every var.X used is declared and every declared variable is used; every
// local used is defined.
func TestTerraformReferences(t *testing.T) {
	m := loadModule(t, asgDir, ".tf")
	declared := map[string]bool{}
	for _, b := range m.all("variable") {
		declared[b.Labels[0]] = false
	}
	locals := map[string]bool{}
	for _, b := range m.all("locals") {
		for name := range b.Body.Attributes {
			locals[name] = true
		}
	}
	for path, body := range m.files {
		for _, tr := range traversals(body) {
			root := tr.RootName()
			if len(tr) < 2 {
				continue
			}
			attr, ok := tr[1].(hcl.TraverseAttr)
			if !ok {
				continue
			}
			name := attr.Name
			switch root {
			case "var":
				if _, ok := declared[name]; !ok {
					t.Errorf("%s: var.%s is not declared in variables.tf", path, name)
				}
				declared[name] = true
			case "local":
				if !locals[name] {
					t.Errorf("%s: local.%s is not defined", path, name)
				}
			}
		}
	}
	for name, used := range declared {
		if !used {
			t.Errorf("variable %q is declared but never used", name)
		}
	}
}

// TestTerraformModule checks what the appliance depends on: NLB target groups per listener port
// that health-check /ready on the metrics port, keep client addresses and drain; the ASG with
// instance refresh and a termination lifecycle hook whose name reaches the instances; IMDSv2; the
// private zones' alias records; least-privilege IAM.
func TestTerraformModule(t *testing.T) {
	m := loadModule(t, asgDir, ".tf")
	path := func(name string) string { return filepath.Join(asgDir, name) }

	tg := m.find(t, "resource", "aws_lb_target_group", "port")
	if got := literal(t, tg, "protocol").AsString(); got != "TCP" {
		t.Errorf("target group protocol %q, want TCP", got)
	}
	if !literal(t, tg, "preserve_client_ip").True() {
		t.Error("target groups must preserve client IPs: the appliance enforces allowedClients on them")
	}
	if src := source(t, path("nlb.tf"), tg, "deregistration_delay"); src != "var.deregistration_delay" {
		t.Errorf("deregistration_delay = %s, want var.deregistration_delay", src)
	}
	hc := nested(t, tg, "health_check")
	if got := literal(t, hc, "path").AsString(); got != "/ready" {
		t.Errorf("health check path %q, want /ready", got)
	}
	if got := literal(t, hc, "protocol").AsString(); got != "HTTP" {
		t.Errorf("health check protocol %q, want HTTP", got)
	}
	if src := source(t, path("nlb.tf"), hc, "port"); !strings.Contains(src, "var.metrics_port") {
		t.Errorf("health check port %s, want the metrics port", src)
	}
	if src := source(t, path("nlb.tf"), tg, "for_each"); src != "local.ports" {
		t.Errorf("target groups for_each %s, want local.ports (one per listener port)", src)
	}
	if src := source(t, path("nlb.tf"), m.find(t, "resource", "aws_lb_listener", "port"), "for_each"); src != "local.ports" {
		t.Errorf("listeners for_each %s, want local.ports", src)
	}
	lb := m.find(t, "resource", "aws_lb", "this")
	if !literal(t, lb, "internal").True() || literal(t, lb, "load_balancer_type").AsString() != "network" {
		t.Error("the load balancer must be an internal NLB")
	}

	asg := m.find(t, "resource", "aws_autoscaling_group", "this")
	if got := literal(t, asg, "health_check_type").AsString(); got != "ELB" {
		t.Errorf("ASG health_check_type %q, want ELB (replace instances that are not ready)", got)
	}
	if got := literal(t, nested(t, asg, "instance_refresh"), "strategy").AsString(); got != "Rolling" {
		t.Errorf("instance refresh strategy %q, want Rolling", got)
	}
	hook := nested(t, asg, "initial_lifecycle_hook")
	if got := literal(t, hook, "lifecycle_transition").AsString(); got != "autoscaling:EC2_INSTANCE_TERMINATING" {
		t.Errorf("lifecycle hook transition %q", got)
	}
	if got := literal(t, hook, "default_result").AsString(); got != "CONTINUE" {
		t.Errorf("lifecycle hook default_result %q, want CONTINUE", got)
	}
	if src := source(t, path("main.tf"), asg, "name"); src != "var.name" {
		t.Errorf("ASG name %s: the instances' lifecycle.env and IAM policy assume var.name", src)
	}

	lt := m.find(t, "resource", "aws_launch_template", "this")
	md := nested(t, lt, "metadata_options")
	if got := literal(t, md, "http_tokens").AsString(); got != "required" {
		t.Errorf("launch template http_tokens %q, want required (IMDSv2)", got)
	}

	// The cloud-init template hands the hook and group names to fwdproxy-lifecycle.service, whose
	// unit reads them from /etc/fwdproxy/lifecycle.env.
	tmpl, err := os.ReadFile(path("templates/cloud-init.yaml.tftpl"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ASG_NAME=${asg_name}", "LIFECYCLE_HOOK_NAME=${lifecycle_hook_name}", "/etc/fwdproxy/lifecycle.env", "/etc/fwdproxy/config.yaml", "#cloud-config"} {
		if !strings.Contains(string(tmpl), want) {
			t.Errorf("cloud-init template lacks %q", want)
		}
	}
	unit, err := os.ReadFile(filepath.Join(packerDir, "files", "fwdproxy-lifecycle.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "EnvironmentFile=/etc/fwdproxy/lifecycle.env") {
		t.Error("fwdproxy-lifecycle.service does not read /etc/fwdproxy/lifecycle.env")
	}

	rec := m.find(t, "resource", "aws_route53_record", "mesh")
	alias := nested(t, rec, "alias")
	if src := source(t, path("dns.tf"), alias, "name"); src != "aws_lb.this.dns_name" {
		t.Errorf("DNS alias target %s, want the NLB", src)
	}
	zone := m.find(t, "resource", "aws_route53_zone", "mesh")
	if !slices.ContainsFunc(zone.Body.Blocks, func(b *hclsyntax.Block) bool { return b.Type == "dynamic" && b.Labels[0] == "vpc" }) {
		t.Error("the mesh zones are not private: no vpc association")
	}

	// IAM: exactly the actions the appliance uses.
	policy, err := os.ReadFile(path("iam.tf"))
	if err != nil {
		t.Fatal(err)
	}
	actions := regexp.MustCompile(`"([a-z0-9-]+:[A-Za-z]+)"`).FindAllStringSubmatch(string(policy), -1)
	var got []string
	for _, a := range actions {
		if a[1] != "sts:AssumeRole" {
			got = append(got, a[1])
		}
	}
	slices.Sort(got)
	got = slices.Compact(got)
	want := []string{
		"acm-pca:GetCertificate", "acm-pca:GetCertificateAuthorityCertificate", "acm-pca:IssueCertificate", "acm-pca:TemplateArn",
		"autoscaling:CompleteLifecycleAction", "autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances",
		"autoscaling:RecordLifecycleActionHeartbeat", "ec2:DescribeInstances", "secretsmanager:GetSecretValue",
	}
	if !slices.Equal(got, want) {
		t.Errorf("IAM actions %v, want exactly %v", got, want)
	}
	if strings.Contains(string(policy), `"*:*"`) || regexp.MustCompile(`"[a-z0-9-]+:\*"`).MatchString(string(policy)) {
		t.Error("IAM policy uses wildcard actions")
	}
}

// TestTerraformExample: the worked example calls the module with every required variable.
func TestTerraformExample(t *testing.T) {
	m := loadModule(t, asgDir, ".tf")
	ex := loadModule(t, filepath.Join(asgDir, "examples", "complete"), ".tf")
	call := ex.find(t, "module", "fwdproxy")
	if got := literal(t, call, "source").AsString(); got != "../.." {
		t.Errorf("example module source %q, want ../..", got)
	}
	for _, v := range m.all("variable") {
		if _, hasDefault := v.Body.Attributes["default"]; hasDefault {
			continue
		}
		if _, ok := call.Body.Attributes[v.Labels[0]]; !ok {
			t.Errorf("the example does not set required variable %q", v.Labels[0])
		}
	}
	for name := range call.Body.Attributes {
		if name == "source" {
			continue
		}
		found := false
		for _, v := range m.all("variable") {
			found = found || v.Labels[0] == name
		}
		if !found {
			t.Errorf("the example sets %q, which the module does not declare", name)
		}
	}
}

//go:build terraform

// Terraform apply against moto needs a build of the AWS provider, which cannot be made from the
// Go module proxy (see providerMirror), so this test is built only with -tags terraform:
// make test-terraform.

package deploytest

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/autoscaling"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/fwdproxy/fwdproxy/internal/awstest"
)

// defaultProviderMirror is a conventional place for HashiCorp's release build of the AWS provider
// in Terraform's unpacked filesystem-mirror layout. The Go module proxy serves no
// terraform-provider-aws release from v2 on (its module path lacks the /vN suffix, and the proxy
// refuses the tags and commits), so the provider cannot be built from Go modules here.
const defaultProviderMirror = "/opt/tf-plugins"

// providerMirror returns a filesystem mirror holding hashicorp/aws 5.x for this platform:
// $FWDPROXY_TF_PROVIDER_MIRROR, else defaultProviderMirror. A machine without one fails the test
// with how to make one.
func providerMirror(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("FWDPROXY_TF_PROVIDER_MIRROR")
	if dir == "" {
		dir = defaultProviderMirror
	}
	pattern := filepath.Join(dir, "registry.terraform.io", "hashicorp", "aws", "5.*", runtime.GOOS+"_"+runtime.GOARCH, "terraform-provider-aws_*")
	if m, _ := filepath.Glob(pattern); len(m) > 0 {
		return dir
	}
	t.Fatalf("no hashicorp/aws 5.x provider for %s_%s in the filesystem mirror %s (looked for %s). "+
		"Make one on a machine that reaches the Terraform registry: `terraform providers mirror DIR` in deploy/asg/examples/complete "+
		"(then unpack each zip into DIR/registry.terraform.io/hashicorp/aws/VERSION/OS_ARCH/), and set FWDPROXY_TF_PROVIDER_MIRROR=DIR",
		runtime.GOOS, runtime.GOARCH, dir, pattern)
	return ""
}

// copyTree copies the files under src (not its dot directories: .terraform and the like) to dst.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if d.IsDir() {
			if strings.HasPrefix(d.Name(), ".") && path != src {
				return filepath.SkipDir
			}
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		if strings.HasPrefix(d.Name(), ".") || strings.HasSuffix(d.Name(), ".tfstate") || strings.HasSuffix(d.Name(), ".tfstate.backup") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTerraformMoto runs the worked example (deploy/asg/examples/complete) through the real
// Terraform workflow with the AWS provider pointed at moto_server: init from a filesystem mirror
// (no registry), validate, plan, apply, then destroy. The example's VPC and subnets are made in
// moto first and swapped in by an override file, with the provider's endpoints and test
// credentials; nothing else of the module is changed.
func TestTerraformMoto(t *testing.T) {
	mirror := providerMirror(t)
	tf := terraformBinary(t)
	// AWS's managed policies (AmazonSSMManagedInstanceCore, which the module attaches) exist in
	// moto only when loaded.
	m := awstest.Start(t, "MOTO_IAM_LOAD_MANAGED_POLICIES=true")
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()

	// The layout the example's relative paths expect: deploy/asg and examples/catalog.yaml.
	root := t.TempDir()
	copyTree(t, asgDir, filepath.Join(root, "deploy", "asg"))
	if err := os.MkdirAll(filepath.Join(root, "examples"), 0o755); err != nil {
		t.Fatal(err)
	}
	catalog, err := os.ReadFile(filepath.Join(repoRoot, "examples", "catalog.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "examples", "catalog.yaml"), catalog, 0o644); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "deploy", "asg", "examples", "complete")

	// The networks the example names, made in moto.
	ec2c := ec2.NewFromConfig(m.Config())
	vpc := func(cidr string) string {
		out, err := ec2c.CreateVpc(ctx, &ec2.CreateVpcInput{CidrBlock: aws.String(cidr)})
		if err != nil {
			t.Fatalf("CreateVpc: %v", err)
		}
		return aws.ToString(out.Vpc.VpcId)
	}
	subnet := func(vpc, cidr, az string) string {
		out, err := ec2c.CreateSubnet(ctx, &ec2.CreateSubnetInput{VpcId: aws.String(vpc), CidrBlock: aws.String(cidr), AvailabilityZone: aws.String(az)})
		if err != nil {
			t.Fatalf("CreateSubnet: %v", err)
		}
		return aws.ToString(out.Subnet.SubnetId)
	}
	fleetVPC := vpc("10.0.0.0/16")
	subnets := []string{subnet(fleetVPC, "10.0.1.0/24", awstest.Region+"a"), subnet(fleetVPC, "10.0.2.0/24", awstest.Region+"b")}
	legacyVPC := vpc("10.60.0.0/16")
	imgs, err := ec2c.DescribeImages(ctx, &ec2.DescribeImagesInput{Owners: []string{"amazon"}})
	if err != nil || len(imgs.Images) == 0 {
		t.Fatalf("DescribeImages: %v", err)
	}
	ami := aws.ToString(imgs.Images[0].ImageId)

	var endpoints strings.Builder
	for _, svc := range []string{"autoscaling", "ec2", "elbv2", "iam", "route53", "sts"} {
		fmt.Fprintf(&endpoints, "    %s = %q\n", svc, m.URL)
	}
	override := fmt.Sprintf(`# Written by deploy/deploytest: the provider talks to moto_server only.
provider "aws" {
  region                      = %q
  access_key                  = %q
  secret_key                  = %q
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  endpoints {
%s  }
}

module "fwdproxy" {
  vpc_id      = %q
  subnet_ids  = [%q, %q]
  dns_vpc_ids = [%q]
}
`, awstest.Region, awstest.AccessKey, awstest.SecretKey, endpoints.String(), fleetVPC, subnets[0], subnets[1], legacyVPC)
	if err := os.WriteFile(filepath.Join(dir, "moto_override.tf"), []byte(override), 0o644); err != nil {
		t.Fatal(err)
	}
	// Providers come from the mirror only: no registry, no other source.
	cliConfig := filepath.Join(root, "terraformrc")
	if err := os.WriteFile(cliConfig, []byte(fmt.Sprintf(`provider_installation {
  filesystem_mirror {
    path    = %q
    include = ["registry.terraform.io/hashicorp/aws"]
  }
}
`, mirror)), 0o644); err != nil {
		t.Fatal(err)
	}
	env := append(awstest.Environ(), "TF_CLI_CONFIG_FILE="+cliConfig, "CHECKPOINT_DISABLE=1", "TF_IN_AUTOMATION=1", "TF_INPUT=0", "TF_PLUGIN_CACHE_DIR=")
	vars := []string{
		"-var", "ami_id=" + ami,
		"-var", "acm_pca_arn=arn:aws:acm-pca:" + awstest.Region + ":" + awstest.Account + ":certificate-authority/0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9",
		"-var", "gossip_keyring_secret_arn=arn:aws:secretsmanager:" + awstest.Region + ":" + awstest.Account + ":secret:fwdproxy-gossip-AbCdEf",
	}
	// terraform runs one command ("plan", "state list") with its arguments, without colours.
	terraform := func(command string, args ...string) string {
		t.Helper()
		start := time.Now()
		argv := append(append(strings.Fields(command), "-no-color"), args...)
		cmd := exec.CommandContext(ctx, tf, argv...)
		cmd.Dir, cmd.Env = dir, env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("terraform %s: %v\n%s", strings.Join(argv, " "), err, out)
		}
		t.Logf("terraform %s: %s", command, time.Since(start).Round(100*time.Millisecond))
		return string(out)
	}
	noWarnings := func(what, out string) {
		t.Helper()
		if strings.Contains(out, "Warning:") {
			t.Errorf("terraform %s warns:\n%s", what, out)
		}
	}

	terraform("init", "-input=false")
	out := terraform("validate")
	if !strings.Contains(out, "Success! The configuration is valid.") {
		t.Fatalf("terraform validate:\n%s", out)
	}
	noWarnings("validate", out)

	out = terraform("plan", append([]string{"-input=false", "-out=plan.bin"}, vars...)...)
	noWarnings("plan", out)
	var plan struct {
		ResourceChanges []struct {
			Address string
			Mode    string
			Change  struct{ Actions []string }
		} `json:"resource_changes"`
	}
	if err := json.Unmarshal([]byte(terraform("show", "-json", "plan.bin")), &plan); err != nil {
		t.Fatal(err)
	}
	var planned []string
	for _, rc := range plan.ResourceChanges {
		if rc.Mode != "managed" {
			continue
		}
		if len(rc.Change.Actions) != 1 || rc.Change.Actions[0] != "create" {
			t.Errorf("%s: planned %v on an empty account, want create", rc.Address, rc.Change.Actions)
		}
		planned = append(planned, rc.Address)
	}
	// 3 listener ports: 3 target groups and listeners; 3 DNS names in 2 zones; the ASG and its
	// launch template, IAM, the security groups and their rules.
	for _, want := range []string{
		"module.fwdproxy.aws_autoscaling_group.this", "module.fwdproxy.aws_launch_template.this", "module.fwdproxy.aws_lb.this",
		`module.fwdproxy.aws_lb_target_group.port["9080"]`, `module.fwdproxy.aws_lb_listener.port["3306"]`,
		`module.fwdproxy.aws_route53_record.mesh["productpage.example.internal"]`, "module.fwdproxy.aws_iam_instance_profile.this",
	} {
		if !strings.Contains(strings.Join(planned, "\n")+"\n", want+"\n") {
			t.Errorf("the plan does not create %s", want)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// apply: every planned resource is created in moto (terraform fails on any it cannot create).
	terraform("apply", "-input=false", "-auto-approve", "plan.bin")
	state := strings.Fields(terraform("state list"))
	created := map[string]bool{}
	for _, a := range state {
		created[a] = true
	}
	for _, a := range planned {
		if !created[a] {
			t.Errorf("%s was planned but is not in the state after apply", a)
		}
	}
	// What the appliance relies on, read back from moto rather than from Terraform.
	asgc := autoscaling.NewFromConfig(m.Config())
	groups, err := asgc.DescribeAutoScalingGroups(ctx, &autoscaling.DescribeAutoScalingGroupsInput{AutoScalingGroupNames: []string{"fwdproxy"}})
	if err != nil || len(groups.AutoScalingGroups) != 1 {
		t.Fatalf("the fleet's group in moto: %v", err)
	}
	g := groups.AutoScalingGroups[0]
	if aws.ToInt32(g.MinSize) != 2 || aws.ToInt32(g.MaxSize) != 6 || aws.ToString(g.HealthCheckType) != "ELB" || len(g.TargetGroupARNs) != 3 {
		t.Errorf("group: min %d max %d health %s, %d target groups; want 2, 6, ELB, 3",
			aws.ToInt32(g.MinSize), aws.ToInt32(g.MaxSize), aws.ToString(g.HealthCheckType), len(g.TargetGroupARNs))
	}
	hooks, err := asgc.DescribeLifecycleHooks(ctx, &autoscaling.DescribeLifecycleHooksInput{AutoScalingGroupName: aws.String("fwdproxy")})
	if err != nil || len(hooks.LifecycleHooks) != 1 || aws.ToString(hooks.LifecycleHooks[0].LifecycleHookName) != "fwdproxy-terminate" {
		t.Errorf("lifecycle hooks: %v (%v), want fwdproxy-terminate", hooks, err)
	}
	lts, err := ec2c.DescribeLaunchTemplateVersions(ctx, &ec2.DescribeLaunchTemplateVersionsInput{
		LaunchTemplateId: g.LaunchTemplate.LaunchTemplateId, Versions: []string{"$Latest"},
	})
	if err != nil || len(lts.LaunchTemplateVersions) != 1 {
		t.Fatalf("launch template: %v", err)
	}
	ltd := lts.LaunchTemplateVersions[0].LaunchTemplateData
	if ltd.MetadataOptions == nil || ltd.MetadataOptions.HttpTokens != ec2types.LaunchTemplateHttpTokensStateRequired || aws.ToString(ltd.ImageId) != ami || aws.ToString(ltd.UserData) == "" {
		t.Errorf("launch template: IMDSv2 required, image %s and user data expected; got %+v", ami, ltd)
	}

	// destroy: nothing is left, in the state or in moto.
	terraform("destroy", append([]string{"-input=false", "-auto-approve"}, vars...)...)
	if left := strings.TrimSpace(terraform("state list")); left != "" {
		t.Errorf("after destroy the state still lists:\n%s", left)
	}
	groups, err = asgc.DescribeAutoScalingGroups(ctx, &autoscaling.DescribeAutoScalingGroupsInput{AutoScalingGroupNames: []string{"fwdproxy"}})
	if err != nil || len(groups.AutoScalingGroups) != 0 {
		t.Errorf("after destroy moto still has the group (%v)", err)
	}
}

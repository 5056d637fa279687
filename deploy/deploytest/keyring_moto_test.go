package deploytest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"
	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/internal/awstest"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

// keyringFetch renders the cloud-init template for region and secret ARN and returns the shell
// command of its first runcmd entry: the boot-time gossip keyring fetch.
func keyringFetch(t *testing.T, region, arn string) string {
	t.Helper()
	path := filepath.Join(asgDir, "templates", "cloud-init.yaml.tftpl")
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, diags := hclsyntax.ParseTemplate(src, path, hcl.InitialPos)
	if diags.HasErrors() {
		t.Fatal(diags.Error())
	}
	ctx := evalContext(asgDir, nil)
	ctx.Variables = map[string]cty.Value{
		"config_yaml": cty.StringVal("{}\n"), "catalog_yaml": cty.NullVal(cty.String),
		"asg_name": cty.StringVal("fwdproxy"), "lifecycle_hook_name": cty.StringVal("fwdproxy-terminate"),
		"units":  cty.TupleVal([]cty.Value{cty.StringVal("fwdproxy.service")}),
		"region": cty.StringVal(region), "gossip_keyring_arn": cty.StringVal(arn),
	}
	var ci struct {
		Runcmd [][]string `yaml:"runcmd"`
	}
	if err := yaml.Unmarshal([]byte(eval(t, path, tmpl, ctx).AsString()), &ci); err != nil {
		t.Fatal(err)
	}
	if len(ci.Runcmd) == 0 || len(ci.Runcmd[0]) != 3 || ci.Runcmd[0][0] != "sh" || ci.Runcmd[0][1] != "-c" {
		t.Fatalf("first runcmd %v is not [sh, -c, COMMAND]", ci.Runcmd)
	}
	return ci.Runcmd[0][2]
}

// TestKeyringFetchMoto runs the image's boot-time keyring fetch, as the cloud-init template
// renders it, with the aws CLI against moto_server's Secrets Manager: the secret is created as the
// README says (`fwdproxy keygen | aws secretsmanager create-secret ...`), and the file the
// daemon then reads must hold exactly that keyring, mode 0600, written by rename. Only the
// paths (/etc/fwdproxy into a temporary directory) and the owner (fwdproxy into the test's user)
// are changed. The CLI is PyPI's awscli (v1, pinned in requirements-test.txt); the image installs
// Debian's awscli, which takes the same arguments.
func TestKeyringFetchMoto(t *testing.T) {
	m := awstest.Start(t)
	env := append(awstest.Environ(), "AWS_ENDPOINT_URL="+m.URL, "PATH="+m.Bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	keyring := peers.GenerateKey() + "\n" + peers.GenerateKey() + "\n"

	create := exec.Command(filepath.Join(m.Bin, "aws"), "secretsmanager", "create-secret", "--name", "fwdproxy-gossip", "--secret-string", "file:///dev/stdin")
	create.Env, create.Stdin = env, strings.NewReader(keyring)
	out, err := create.Output()
	if err != nil {
		t.Fatalf("aws secretsmanager create-secret: %v\n%s", err, stderrOf(err))
	}
	var secret struct{ ARN string }
	if err := json.Unmarshal(out, &secret); err != nil || !strings.Contains(secret.ARN, ":secret:fwdproxy-gossip") {
		t.Fatalf("create-secret answered %s (%v)", out, err)
	}

	run := func(t *testing.T, arn string) (dir string, output []byte, err error) {
		dir = t.TempDir()
		cmd := keyringFetch(t, awstest.Region, arn)
		for old, n := range map[string]int{"/etc/fwdproxy/": 4, "chown fwdproxy:fwdproxy ": 1} {
			if got := strings.Count(cmd, old); got != n {
				t.Fatalf("the fetch %q has %q %d times, want %d", cmd, old, got, n)
			}
		}
		cmd = strings.ReplaceAll(cmd, "/etc/fwdproxy/", dir+"/")
		cmd = strings.ReplaceAll(cmd, "chown fwdproxy:fwdproxy ", "chown "+strconv.Itoa(os.Getuid())+":"+strconv.Itoa(os.Getgid())+" ")
		sh := exec.Command("sh", "-c", cmd)
		sh.Env = env
		output, err = sh.CombinedOutput()
		return dir, output, err
	}

	t.Run("fetches", func(t *testing.T) {
		dir, output, err := run(t, secret.ARN)
		if err != nil {
			t.Fatalf("keyring fetch: %v\n%s", err, output)
		}
		path := filepath.Join(dir, "gossip.keys")
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("gossip.keys mode %v, want 0600", fi.Mode().Perm())
		}
		if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
			t.Errorf("the temporary file is left behind: %v", err)
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(string(got)) != strings.TrimSpace(keyring) {
			t.Fatalf("gossip.keys = %q, want the secret %q", got, keyring)
		}
		keys, err := peers.LoadKeyring(path, func(msg string) { t.Error(msg) })
		if err != nil || len(keys) != 2 {
			t.Fatalf("the daemon's loader: %d keys, %v", len(keys), err)
		}
	})

	t.Run("missing secret leaves no keyring", func(t *testing.T) {
		dir, output, err := run(t, strings.Replace(secret.ARN, "fwdproxy-gossip", "no-such-secret", 1))
		if err == nil || !strings.Contains(string(output), "ResourceNotFoundException") {
			t.Fatalf("fetch of a missing secret: err %v, output %s; want ResourceNotFoundException", err, output)
		}
		if _, err := os.Stat(filepath.Join(dir, "gossip.keys")); !os.IsNotExist(err) {
			t.Fatalf("gossip.keys exists after a failed fetch: %v", err)
		}
	})
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

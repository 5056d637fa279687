package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// TestHelpIsOnStdoutWithExit0: every way of asking for help prints it on stdout and exits 0.
func TestHelpIsOnStdoutWithExit0(t *testing.T) {
	for _, args := range [][]string{
		{}, {"-h"}, {"--help"}, {"help"}, {"help", "validate"},
		{"run", "-h"}, {"validate", "--help"}, {"apply", "-h"}, {"delete", "--help"}, {"status", "-h"},
		{"demo", "-h"}, {"dataplane", "-h"}, {"mesh-config", "-h"}, {"version", "-h"}, {"completion", "-h"},
	} {
		stdout, stderr, err := run(t, args...)
		if exitCode(err) != 0 || stderr != "" || !strings.Contains(stdout, "Usage:") {
			t.Errorf("fwdproxy %s: exit %d, stderr %q, stdout:\n%s", strings.Join(args, " "), exitCode(err), stderr, stdout)
		}
		if strings.Contains(stdout+stderr, "flag: help requested") {
			t.Errorf("fwdproxy %s reports help as an error", strings.Join(args, " "))
		}
	}
}

// TestEveryCommandHasADescriptionAndExamples: one line in the command list, and examples in its
// help.
func TestEveryCommandHasADescriptionAndExamples(t *testing.T) {
	for _, c := range newRootCmd().Commands() {
		if c.Name() == "help" || c.Name() == "completion" {
			continue
		}
		if c.Short == "" || strings.Contains(c.Short, "\n") || c.Example == "" || c.Long == "" && c.Name() != "keygen" {
			t.Errorf("%s: short %q, long %d bytes, example %q", c.Name(), c.Short, len(c.Long), c.Example)
		}
	}
}

// TestUsageErrorsOnceWithExit2: a wrong flag, a missing or unexpected argument is reported once,
// on stderr, with exit 2 and where to find the usage.
func TestUsageErrorsOnceWithExit2(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"run", "--nope"}, "unknown flag: --nope"},
		{[]string{"render", "--config"}, "flag needs an argument: --config"},
		{[]string{"status", "-o", "xml"}, `--output "xml": use text or json or yaml`},
		{[]string{"run", "extra"}, `unexpected argument "extra": fwdproxy run takes no arguments`},
		{[]string{"status", "extra"}, `unexpected argument "extra"`},
		{[]string{"stauts"}, `unknown command "stauts" for "fwdproxy"; did you mean status?`},
		{[]string{"delete"}, "name what to delete: HOST..., -f FILE or --all-applied"},
		{[]string{"delete", "a.b.svc.cluster.local", "--all-applied"}, "give one of HOST..., -f FILE or --all-applied"},
		{[]string{"apply"}, "-f FILE is required"},
		{[]string{"validate", "a.yaml", "b.yaml"}, "validate takes one config file, got 2 arguments"},
		{[]string{"validate", "--config", "a.yaml", "b.yaml"}, "the config is given twice (--config a.yaml and b.yaml)"},
		{[]string{"render", "--write-sds"}, "--sds-dir and --write-sds go with --static"},
	}
	for _, tc := range cases {
		stdout, stderr, err := run(t, tc.args...)
		if exitCode(err) != 2 || stdout != "" || strings.Count(stderr, tc.want) != 1 || !strings.Contains(stderr, "--help' for usage.") {
			t.Errorf("fwdproxy %s: exit %d, stdout %q, stderr (want %q once):\n%s", strings.Join(tc.args, " "), exitCode(err), stdout, tc.want, stderr)
		}
		if lines := strings.Count(strings.TrimSpace(stderr), "\n") + 1; lines != 2 {
			t.Errorf("fwdproxy %s: %d lines on stderr, want the error and the pointer to --help:\n%s", strings.Join(tc.args, " "), lines, stderr)
		}
	}
}

// TestCompletion: the shell completion scripts.
func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{"bash": "__start_fwdproxy", "zsh": "#compdef fwdproxy", "fish": "complete -c fwdproxy"} {
		stdout, stderr, err := run(t, "completion", shell)
		if err != nil || !strings.Contains(stdout, want) {
			t.Errorf("completion %s: %v %s\n%.300s", shell, err, stderr, stdout)
		}
	}
}

// TestVersion: the version and commit the toolchain recorded in the binary (as `go version -m`
// reads them), Go's version, and Envoy's from `envoy --version`, or "not found".
func TestVersion(t *testing.T) {
	envoy, err := meshtest.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	mod, err := exec.Command("go", "version", "-m", binary).Output()
	if err != nil {
		t.Fatal(err)
	}
	setting := func(key string) string {
		m := regexp.MustCompile(`(?m)^\s+build\s+` + regexp.QuoteMeta(key) + `=(\S+)$`).FindSubmatch(mod)
		if m == nil {
			return ""
		}
		return string(m[1])
	}
	modVersion := regexp.MustCompile(`(?m)^\s+mod\s+github.com/fwdproxy/fwdproxy\s+(\S+)`).FindSubmatch(mod)
	if modVersion == nil {
		t.Fatalf("go version -m:\n%s", mod)
	}
	if rev := setting("vcs.revision"); rev != "" {
		head, err := exec.Command("git", "rev-parse", "HEAD").Output()
		if err != nil || strings.TrimSpace(string(head)) != rev {
			t.Errorf("the binary's commit %s is not HEAD %s (%v)", rev, head, err)
		}
	}

	stdout, stderr, err := run(t, "version", "-o", "json", "--envoy", envoy)
	var v versionInfo
	if err != nil || json.Unmarshal([]byte(stdout), &v) != nil {
		t.Fatalf("version -o json: %v %s\n%s", err, stderr, stdout)
	}
	if v.Version != string(modVersion[1]) || v.Commit != setting("vcs.revision") || v.GoVersion != runtime.Version() || v.EnvoyPath != envoy {
		t.Errorf("version %+v, build info:\n%s", v, mod)
	}
	envoyOut, err := exec.Command(envoy, "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`version: ([0-9a-f]+)/([^/\s]+)`).FindStringSubmatch(string(envoyOut))
	if m == nil || v.Envoy != m[2]+" (commit "+m[1]+")" {
		t.Errorf("envoy %q, envoy --version says %q", v.Envoy, envoyOut)
	}

	stdout, _, err = run(t, "version", "--envoy", filepath.Join(t.TempDir(), "envoy"))
	if err != nil || !strings.Contains(stdout, "fwdproxy "+string(modVersion[1])+"\n") || !strings.Contains(stdout, "go:       "+runtime.Version()) ||
		!strings.Contains(stdout, "envoy:    not found\n") {
		t.Errorf("version without Envoy: %v\n%s", err, stdout)
	}
}

// TestValidateEveryProblemInOneRun: problems of the config, of each catalog file and of the
// identity, each as file:line: field: what is wrong; the fix, in one run; -o json for machines.
func TestValidateEveryProblemInOneRun(t *testing.T) {
	cfg := cliConfig(t)
	dir := filepath.Dir(cfg)
	body, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	stdout, _, err := run(t, "validate", "-o", "json", cfg)
	var good validation
	if err != nil || json.Unmarshal([]byte(stdout), &good) != nil || !good.OK || len(good.Problems) != 0 || !good.Built || good.Services != 4 || good.Clusters != 5 {
		t.Fatalf("validate -o json of a good config: %v\n%s", err, stdout)
	}
	bad := strings.Replace(string(body), "discovery: {files: [catalog.yaml]}", `discovery: {files: [catalog.yaml, missing.yaml]}
listen:
  adress: 0.0.0.0
upstream:
  connectTimeout: 5`, 1)
	if err := os.WriteFile(cfg, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte(`services:
  - host: a.ns.svc.cluster.local
    ports: [{number: nine, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
  - host: b.ns.svc.cluster.local
    ports:
      - number: 80
        protocl: http
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, "key.pem"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := func(line int, rest string) string { return cfg + ":" + strconv.Itoa(line) + ": " + rest }
	k := func(line int, rest string) string {
		return filepath.Join(dir, "catalog.yaml") + ":" + strconv.Itoa(line) + ": " + rest
	}
	want := []string{
		c(11, `listen.adress: unknown field "adress"; did you mean "address"?`),
		c(13, `upstream.connectTimeout: 5 is a number without a unit; write a duration such as 5s, 5ms or 2m`),
		k(3, `services[0].ports[0].number: "nine" is not an integer; the field wants a whole number, e.g. 8080`),
		k(7, `services[1].ports[0].protocol: required: one of http, http2, grpc, tcp`),
		k(8, `services[1].ports[0].protocl: unknown field "protocl"; did you mean "protocol"?`),
		c(9, `discovery.files[1]: open `+filepath.Join(dir, "missing.yaml")+`: no such file or directory`),
		c(8, `identity.files.privateKey: `+filepath.Join(dir, "key.pem")+` is mode 0644, readable by group or others; only the daemon may read the fleet's key: chmod 600`),
	}
	// The config as the one argument.
	stdout, stderr, err := run(t, "validate", cfg)
	if exitCode(err) != 1 || stdout != "" {
		t.Fatalf("validate: exit %d\n%s%s", exitCode(err), stdout, stderr)
	}
	for _, w := range want {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr lacks\n  %s\nin:\n%s", w, stderr)
		}
	}
	for _, bad := range []string{"uint32", "time.Duration", "config.Listen", "!!str", "cannot unmarshal"} {
		if strings.Contains(stderr, bad) {
			t.Errorf("stderr names a Go type or YAML tag (%s):\n%s", bad, stderr)
		}
	}
	if !strings.HasSuffix(stderr, cfg+": 7 problems\n") {
		t.Errorf("stderr does not end with the count:\n%s", stderr)
	}

	stdout, _, err = run(t, "validate", "-o", "json", "--config", cfg)
	var v validation
	if exitCode(err) != 1 || json.Unmarshal([]byte(stdout), &v) != nil || v.OK || len(v.Problems) != len(want) {
		t.Fatalf("validate -o json: exit %d\n%s", exitCode(err), stdout)
	}
	if p := v.Problems[2]; p.File != filepath.Join(dir, "catalog.yaml") || p.Line != 3 || p.Path != "services[0].ports[0].number" || !strings.HasPrefix(p.Message, `"nine" is not an integer`) {
		t.Errorf("problem %+v", p)
	}

	// A mis-indented line is reported where it is, not where its block starts.
	if err := os.WriteFile(cfg, []byte(string(body)+"listen:\n  address: 0.0.0.0\n  accessLog: false\n maxConnections: 10\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err = run(t, "validate", cfg)
	if exitCode(err) != 1 || !strings.Contains(stderr, c(13, "YAML syntax: ")) {
		t.Errorf("mis-indented line 13: exit %d\n%s", exitCode(err), stderr)
	}

	// A file that is not there is one problem, with the fix.
	_, stderr, err = run(t, "validate", filepath.Join(dir, "nope.yaml"))
	if exitCode(err) != 1 || !strings.Contains(stderr, "no such file or directory; give the config with --config FILE") {
		t.Errorf("missing config: exit %d\n%s", exitCode(err), stderr)
	}
}

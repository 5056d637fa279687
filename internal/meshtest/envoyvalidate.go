package meshtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"time"
)

// envoyComplaint matches what Envoy logs about a configuration it accepts but objects to: any
// line at warning level or above (deprecated fields are logged as "Using deprecated option ..."
// or "Deprecated field ..." at warning), and any mention of deprecation at all.
var envoyComplaint = regexp.MustCompile(`(?i)\[(warning|error|critical)\]|deprecat`)

// EnvoyValidateResult is one `envoy --mode validate` run.
type EnvoyValidateResult struct {
	Elapsed time.Duration
	Output  string // stdout and stderr
}

// EnvoyValidate runs `envoy --mode validate -c config` with args added (e.g. --config-yaml). It
// returns an error when Envoy cannot be found (saying how to install it), when Envoy exits
// non-zero or does not report the configuration OK, and when Envoy accepts the configuration but
// logs a warning about it, such as a deprecated field: a configuration the product emits must be
// accepted silently. It is bounded by timeout.
func EnvoyValidate(config string, timeout time.Duration, args ...string) (EnvoyValidateResult, error) {
	bin, err := EnvoyPath()
	if err != nil {
		return EnvoyValidateResult{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// Warning level: info would print the startup banner; warnings are what must not appear.
	argv := append([]string{"--mode", "validate", "-c", config, "--log-level", "warning", "--disable-hot-restart"}, args...)
	cmd := exec.CommandContext(ctx, bin, argv...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err = cmd.Run()
	res := EnvoyValidateResult{Elapsed: time.Since(start), Output: out.String()}
	switch {
	case ctx.Err() != nil:
		return res, fmt.Errorf("envoy --mode validate %s did not finish within %s:\n%s", config, timeout, res.Output)
	case err != nil:
		return res, fmt.Errorf("envoy rejects %s (%v):\n%s", config, err, res.Output)
	}
	var complaints []string
	for _, line := range strings.Split(res.Output, "\n") {
		if envoyComplaint.MatchString(line) {
			complaints = append(complaints, line)
		}
	}
	if len(complaints) > 0 {
		return res, errors.New("envoy accepts " + config + " but warns about it:\n" + strings.Join(complaints, "\n"))
	}
	if !strings.Contains(res.Output, "OK") {
		return res, fmt.Errorf("envoy --mode validate %s exited 0 without reporting the configuration OK:\n%s", config, res.Output)
	}
	return res, nil
}

package meshtest

import (
	"fmt"
	"os"
)

// helperEnv selects the helper a re-run test binary executes instead of its tests.
const helperEnv = "FWDPROXY_TEST_HELPER"

// Nobody is the unprivileged user and group (Debian's nobody and nogroup) the tests connect as
// to show that another local user is refused.
const Nobody = 65534

// RunHelper runs the helper named by the environment and exits, when this process was started
// by AsUser; otherwise it returns at once. Call it first in TestMain. A helper gets the
// command-line arguments and returns the exit code.
func RunHelper(helpers map[string]func(args []string) int) {
	name := os.Getenv(helperEnv)
	if name == "" {
		return
	}
	f := helpers[name]
	if f == nil {
		fmt.Fprintf(os.Stderr, "no test helper %q\n", name)
		os.Exit(2)
	}
	os.Exit(f(os.Args[1:]))
}

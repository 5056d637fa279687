package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func init() { commands = append(commands, newVersionCmd) }

// versionInfo is what fwdproxy version prints: the build's own record (module version, VCS
// commit), the Go toolchain, and the Envoy it would run.
type versionInfo struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"`
	CommitAt  string `json:"commitTime,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
	// Envoy is Envoy's version, or "not found"; EnvoyPath is the binary asked.
	Envoy     string `json:"envoy"`
	EnvoyPath string `json:"envoyPath,omitempty"`
}

func newVersionCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print fwdproxy's version and commit, its Go version and the Envoy version",
		Long: `Print fwdproxy's version and commit (as the Go toolchain recorded them in the binary), the
Go version it was built with, and the version of the Envoy it would run (--envoy, by default
envoy on PATH; "not found" when there is none).`,
		Example: `  fwdproxy version
  fwdproxy version -o json --envoy /usr/local/bin/envoy`,
		Args: noArgs,
	}
	output := cmd.Flags().StringP("output", "o", "text", "output format: text or json")
	envoy := cmd.Flags().String("envoy", "envoy", "the Envoy binary to ask: a path, or a name looked up in PATH")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := oneOf("output", *output, "text", "json"); err != nil {
			return err
		}
		v := buildVersion()
		v.Envoy, v.EnvoyPath = envoyVersion(*envoy)
		out := cmd.OutOrStdout()
		if *output == "json" {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			return enc.Encode(v)
		}
		commit := v.Commit
		if commit == "" {
			commit = "unknown (built without VCS information)"
		} else if v.Modified {
			commit += " (with uncommitted changes)"
		}
		if v.CommitAt != "" {
			commit += ", " + v.CommitAt
		}
		envoyLine := v.Envoy
		if v.EnvoyPath != "" {
			envoyLine += " (" + v.EnvoyPath + ")"
		}
		fmt.Fprintf(out, "fwdproxy %s\ncommit:   %s\ngo:       %s %s\nenvoy:    %s\n", v.Version, commit, v.GoVersion, v.Platform, envoyLine)
		return nil
	}
	return cmd
}

// buildVersion reads the version the Go toolchain stamped into the binary: the module version
// ("(devel)" for a build from a work tree) and the VCS commit.
func buildVersion() versionInfo {
	v := versionInfo{Version: "(unknown)", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	v.GoVersion = info.GoVersion
	if info.Main.Version != "" {
		v.Version = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Commit = s.Value
		case "vcs.time":
			v.CommitAt = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

// envoyVersionRe finds the version in `envoy --version`: "envoy  version: SHA/1.36.2/Clean/RELEASE/BoringSSL".
var envoyVersionRe = regexp.MustCompile(`version: ([0-9a-f]+)/([^/\s]+)`)

// envoyVersion asks the Envoy binary for its version: "1.36.2 (commit SHA)", or "not found".
func envoyVersion(binary string) (version, path string) {
	path, err := exec.LookPath(binary)
	if err != nil {
		return "not found", ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Sprintf("unknown (%s --version: %v)", path, err), path
		}
		return fmt.Sprintf("unknown (%v)", err), path
	}
	if m := envoyVersionRe.FindStringSubmatch(string(out)); m != nil {
		return fmt.Sprintf("%s (commit %s)", m[2], m[1]), path
	}
	return strings.TrimSpace(string(out)), path
}

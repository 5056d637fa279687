// Command fwdproxy is the forwarding-proxy appliance's one binary: the daemon and its tools.
//
// The command line follows kubectl's and istioctl's conventions (spf13/cobra): help on stdout
// with exit 0, flags anywhere on the line, a usage error reported once with exit 2, any other
// failure with exit 1.
package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

func main() { os.Exit(execute(os.Args[1:], os.Stdout, os.Stderr)) }

// usageError is a command line the command cannot run: a wrong flag, a missing or unexpected
// argument. It exits 2, like a flag package's usage errors.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// silentError exits with code without printing more: the command has already said what is
// wrong (validate's problem list).
type silentError struct{ code int }

func (e silentError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// commands builds the subcommands; each file adds its own in init.
var commands []func() *cobra.Command

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "fwdproxy",
		Short: "Forwarding proxy from legacy VMs into an Istio mesh: the daemon and its tools",
		Long: `fwdproxy lets legacy VMs call services inside an Istio mesh: plain TCP/HTTP in, Istio mTLS
out through the mesh's east-west gateway. This one binary is the daemon (fwdproxy run) and
the operator's tools: check a config (validate), see what would be served (render,
bootstrap), change the fleet's services (apply, delete), see how an instance and the fleet are
doing (status), and try it all on loopback (demo).`,
		Example: `  # Try it on this machine: a stand-in mesh, the daemon and its data plane
  fwdproxy demo

  # Check a config, its catalog files and its identity; every problem at once
  fwdproxy validate --config /etc/fwdproxy/config.yaml

  # Add services to every instance of the fleet, then see their state
  fwdproxy apply -f services.yaml
  fwdproxy status`,
		SilenceUsage:               true,
		SilenceErrors:              true,
		SuggestionsMinimumDistance: 2,
		// Runnable, so that an unknown command reaches Args (a command without Run is only
		// ever shown help).
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
			if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
				msg += "; did you mean " + strings.Join(s, " or ") + "?"
			}
			return usageError{errors.New(msg)}
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	// The root runs only to refuse unknown commands: its usage is "fwdproxy [command]".
	root.SetUsageTemplate(strings.Replace(root.UsageTemplate(), "{{if .Runnable}}", "{{if and .Runnable .HasParent}}", 1))
	for _, c := range commands {
		root.AddCommand(c())
	}
	return root
}

// execute runs the command line args and returns the exit code.
func execute(args []string, stdout, stderr io.Writer) int {
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteC()
	var silent silentError
	var usage usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &silent):
		return silent.code
	case errors.As(err, &usage):
		fmt.Fprintf(stderr, "Error: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
		return 2
	}
	fmt.Fprintf(stderr, "%s: %s\n", cmd.CommandPath(), strings.ReplaceAll(err.Error(), "\n", "\n  "))
	return 1
}

// noArgs refuses positional arguments: a word meant as a flag's value but separated from it, or
// a file named without its flag, must not be ignored.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("unexpected argument %q: %s takes no arguments (see its flags)", args[0], cmd.CommandPath())
	}
	return nil
}

// oneOf checks a flag's value against the allowed ones.
func oneOf(flag, value string, allowed ...string) error {
	for _, a := range allowed {
		if value == a {
			return nil
		}
	}
	return usagef("--%s %q: use %s", flag, value, strings.Join(allowed, " or "))
}

// newLogger logs JSON (for log pipelines) or text.
func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, usagef("--log-format %q: use json or text", format)
}

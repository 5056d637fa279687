package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/internal/strictyaml"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
)

func init() { commands = append(commands, newValidateCmd) }

// validation is what fwdproxy validate found: every problem, each where it is, and what would be
// served. It is the JSON of -o json.
type validation struct {
	Config   string              `json:"config"`
	OK       bool                `json:"ok"`
	Problems []*strictyaml.Error `json:"problems"`
	Warnings []string            `json:"warnings,omitempty"`
	// Services, Listeners and Clusters are what the daemon would serve (0 when not built).
	Services  int    `json:"services"`
	Listeners int    `json:"listeners"`
	Clusters  int    `json:"clusters"`
	Identity  string `json:"identity,omitempty"`
	// Built is false when no gateway address is known here, so no Envoy configuration was built.
	Built bool `json:"built"`
}

func newValidateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "validate [CONFIG]",
		Short: "Check a config, its catalog files and its identity; print every problem",
		Long: `Check a config file, the catalog files it lists and its identity files, and build the Envoy
configuration the daemon would serve from them. Every problem found is printed in one run, each
as FILE:LINE: FIELD: what is wrong; the fix. Exit 0 when there is none, 1 otherwise.

The config is --config, or the one argument.`,
		Example: `  fwdproxy validate /etc/fwdproxy/config.yaml
  fwdproxy validate --config /etc/fwdproxy/config.yaml -o json | jq -r '.problems[] | "\(.file):\(.line): \(.message)"'`,
		Args: cobra.ArbitraryArgs,
	}
	path := configFlag(cmd)
	output := cmd.Flags().StringP("output", "o", "text", "output format: text or json")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := oneOf("output", *output, "text", "json"); err != nil {
			return err
		}
		switch {
		case len(args) > 1:
			return usagef("validate takes one config file, got %d arguments: %s", len(args), strings.Join(args, " "))
		case len(args) == 1 && cmd.Flags().Changed("config"):
			return usagef("the config is given twice (--config %s and %s); give one", *path, args[0])
		case len(args) == 1:
			*path = args[0]
		}
		v := validate(*path)
		if *output == "json" {
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			if err := enc.Encode(v); err != nil {
				return err
			}
		} else {
			printValidation(cmd.OutOrStdout(), cmd.ErrOrStderr(), v)
		}
		if !v.OK {
			return silentError{1}
		}
		return nil
	}
	return cmd
}

func printValidation(stdout, stderr io.Writer, v *validation) {
	for _, w := range v.Warnings {
		fmt.Fprintln(stderr, "warning:", w)
	}
	for _, p := range v.Problems {
		fmt.Fprintln(stderr, p.Error())
	}
	if !v.OK {
		noun := "problems"
		if len(v.Problems) == 1 {
			noun = "problem"
		}
		fmt.Fprintf(stderr, "%s: %d %s\n", v.Config, len(v.Problems), noun)
		return
	}
	if !v.Built {
		fmt.Fprintf(stdout, "%s: ok: %d services; no gateway address is known offline, so the Envoy configuration was not built; identity %s\n", v.Config, v.Services, v.Identity)
		return
	}
	fmt.Fprintf(stdout, "%s: ok: %d services, %d listeners, %d clusters; identity %s\n", v.Config, v.Services, v.Listeners, v.Clusters, v.Identity)
}

// validate checks the config at path and everything it points at, going on past each problem as
// far as what is left allows.
func validate(path string) *validation {
	v := &validation{Config: path, Problems: []*strictyaml.Error{}}
	defer func() { v.OK = len(v.Problems) == 0 }()
	data, err := os.ReadFile(path)
	if err != nil {
		v.Problems = append(v.Problems, &strictyaml.Error{File: path, Message: fmt.Sprintf("%v; give the config with --config FILE", err)})
		return v
	}
	cfg, err := config.Check(path, data)
	v.add(err, nil)
	if cfg == nil {
		return v
	}
	cat, opts, bundle, notes, err := daemon.Offline(context.Background(), cfg)
	v.Warnings = append(v.Warnings, notes...)
	v.add(err, cfg)
	v.Identity = "issued at run time"
	if bundle != nil {
		v.Identity = bundle.String()
	}
	v.Services = len(cat.Services)
	if len(opts.Gateways) == 0 {
		return v
	}
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		v.add(err, cfg)
		return v
	}
	for _, s := range res.Skipped {
		msg := fmt.Sprintf("service %s left out (%s): %s", s.Host, s.Reason, s.Detail)
		if s.Reason == controlplane.SkipNoGatewayAddress { // its gateways may resolve where the daemon runs
			v.Warnings = append(v.Warnings, msg)
			continue
		}
		e := serviceError(cfg, s.Host)
		e.Message = "would be left out of the configuration (" + s.Reason + "): " + s.Detail
		v.Problems = append(v.Problems, e)
	}
	if _, err := controlplane.NewSnapshot(res, bundle); err != nil {
		v.add(err, cfg)
		return v
	}
	v.Built = true
	v.Services -= len(res.Skipped)
	v.Listeners, v.Clusters = len(res.Listeners), len(res.Clusters)
	return v
}

// add records err's problems: each *strictyaml.Error as it is, any other error placed as well
// as its words allow (a catalog file's or an identity file's field in the config).
func (v *validation) add(err error, cfg *config.Config) {
	for _, e := range leaves(err) {
		var se *strictyaml.Error
		if errors.As(e, &se) {
			v.Problems = append(v.Problems, se)
			continue
		}
		v.Problems = append(v.Problems, place(e.Error(), cfg))
	}
}

// leaves flattens joined errors into the errors they join.
func leaves(err error) []error {
	if err == nil {
		return nil
	}
	var se *strictyaml.Error
	if errors.As(err, &se) && se == err {
		return []error{err}
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, leaves(e)...)
		}
		return out
	}
	return []error{err}
}

// place finds the config field an error without a position is about: a catalog file that could
// not be read, an identity file.
func place(msg string, cfg *config.Config) *strictyaml.Error {
	e := &strictyaml.Error{Message: msg}
	if cfg == nil {
		return e
	}
	e.File = cfg.File()
	for i, f := range cfg.Discovery.Files {
		if strings.Contains(msg, cfg.Path(f)) {
			e.Path = fmt.Sprintf("discovery.files[%d]", i)
			e.Message = strings.TrimPrefix(msg, "read catalog: ")
		}
	}
	if rest, ok := strings.CutPrefix(msg, "identity: "); ok {
		e.Path, e.Message = "identity", rest
		if f := cfg.Identity.Files; f != nil {
			for _, x := range []struct{ field, path string }{{"certChain", f.CertChain}, {"privateKey", f.PrivateKey}, {"roots", f.Roots}} {
				field := "identity.files." + x.field
				switch {
				case strings.HasPrefix(rest, field+": "):
					e.Path, e.Message = field, strings.TrimPrefix(rest, field+": ")
				case e.Path == "identity" && strings.Contains(rest, cfg.Path(x.path)):
					e.Path = field
				}
			}
			switch {
			case e.Path != "identity":
			case strings.HasPrefix(rest, "certificate chain"):
				e.Path = "identity.files.certChain"
			case strings.HasPrefix(rest, "roots"):
				e.Path = "identity.files.roots"
			case strings.HasPrefix(rest, "private key"):
				e.Path = "identity.files.privateKey"
			}
		}
	}
	if e.Path != "" {
		e.Line = cfg.Line(e.Path)
	}
	return e
}

// serviceError points at the host field of the catalog file entry for host.
func serviceError(cfg *config.Config, host string) *strictyaml.Error {
	for _, f := range cfg.Discovery.Files {
		data, err := os.ReadFile(cfg.Path(f))
		if err != nil {
			continue
		}
		var doc struct {
			Services []struct {
				Host yaml.Node `yaml:"host"`
			} `yaml:"services"`
		}
		if yaml.NewDecoder(bytes.NewReader(data)).Decode(&doc) != nil {
			continue
		}
		for i, s := range doc.Services {
			if strings.TrimSuffix(strings.ToLower(s.Host.Value), ".") == host {
				return &strictyaml.Error{File: filepath.Clean(cfg.Path(f)), Line: s.Host.Line, Path: fmt.Sprintf("services[%d].host", i)}
			}
		}
	}
	return &strictyaml.Error{File: cfg.File(), Path: "service " + host}
}

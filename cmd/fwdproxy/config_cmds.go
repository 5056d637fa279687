package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

func init() {
	commands = append(commands, newRunCmd, newRenderCmd, newBootstrapCmd)
}

const defaultConfig = "/etc/fwdproxy/config.yaml"

func configFlag(cmd *cobra.Command) *string {
	return cmd.Flags().String("config", defaultConfig, "daemon config file")
}

func newRunCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the daemon: discovery, identity, xDS server and data plane",
		Long: `Run the daemon: it discovers the mesh's services (catalog files, Kubernetes, the fleet's
operator entries), holds the fleet's identity, serves Envoy's configuration over xDS and runs
the configured data plane (builtin, envoy, or none) until SIGINT or SIGTERM.`,
		Example: `  fwdproxy run --config /etc/fwdproxy/config.yaml --log-format text`,
		Args:    noArgs,
	}
	path := configFlag(cmd)
	logFormat := cmd.Flags().String("log-format", "json", "log format: json or text")
	logLevel := cmd.Flags().String("log-level", "info", "log level: debug, info, warn, error")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		log, err := newLogger(*logFormat, *logLevel)
		if err != nil {
			return err
		}
		cfg, err := config.Load(*path)
		if err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return daemon.New(cfg, log).Run(ctx)
	}
	return cmd
}

// staticInputs is daemon.Offline with its notes printed as warnings on stderr.
func staticInputs(cfg *config.Config) (*catalog.Catalog, controlplane.Options, *identity.Bundle, error) {
	cat, opts, bundle, notes, err := daemon.Offline(context.Background(), cfg)
	for _, n := range notes {
		fmt.Fprintln(os.Stderr, "warning:", n)
	}
	return cat, opts, bundle, err
}

// reportSkipped says on w which services translation left out. Offline, a service whose gateways
// did not resolve here is only a warning (they may resolve where the daemon runs); with strict,
// any other reason is an error, since the daemon would leave the service out too.
func reportSkipped(w io.Writer, skipped []controlplane.SkippedService, strict bool) error {
	var errs []error
	for _, s := range skipped {
		if strict && s.Reason != controlplane.SkipNoGatewayAddress {
			errs = append(errs, fmt.Errorf("service %s would be left out of the configuration (%s): %s", s.Host, s.Reason, s.Detail))
			continue
		}
		fmt.Fprintf(w, "warning: service %s left out (%s): %s\n", s.Host, s.Reason, s.Detail)
	}
	return errors.Join(errs...)
}

func newRenderCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "render",
		Short: "Print the Envoy resources the daemon would serve, as JSON",
		Long: `Print the Envoy resources (listeners, routes, clusters, endpoints, secrets) the daemon would
serve for the config, as JSON; the private key is redacted. With --static, print instead one
complete static Envoy config (no control plane) with file-based SDS.`,
		Example: `  fwdproxy render --config /etc/fwdproxy/config.yaml | jq '.clusters[].name'
  fwdproxy render --static --write-sds --sds-dir /etc/envoy/sds --config /etc/fwdproxy/config.yaml > envoy.json`,
		Args: noArgs,
	}
	path := configFlag(cmd)
	static := cmd.Flags().Bool("static", false, "print one complete static Envoy config (no control plane) with file-based SDS")
	sdsDir := cmd.Flags().String("sds-dir", "/etc/fwdproxy/sds", "with --static: directory of the SDS files default.json and ROOTCA.json")
	writeSDS := cmd.Flags().Bool("write-sds", false, "with --static: also write the SDS files into --sds-dir (they reference the PEM files; no key is copied)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if !*static && (cmd.Flags().Changed("sds-dir") || *writeSDS) {
			return usagef("--sds-dir and --write-sds go with --static")
		}
		cfg, err := config.Load(*path)
		if err != nil {
			return err
		}
		if *static {
			return renderStatic(cfg, *sdsDir, *writeSDS)
		}
		cat, opts, bundle, err := staticInputs(cfg)
		if err != nil {
			return err
		}
		res, err := controlplane.Translate(cat, opts)
		if err != nil {
			return err
		}
		_ = reportSkipped(os.Stderr, res.Skipped, false)
		if _, err := controlplane.NewSnapshot(res, bundle); err != nil {
			return err
		}
		out, err := controlplane.RenderJSON(res, controlplane.Secrets(bundle))
		if err != nil {
			return err
		}
		fmt.Println(string(out))
		return nil
	}
	return cmd
}

func renderStatic(cfg *config.Config, sdsDir string, write bool) error {
	cat, conflicts, err := daemon.CatalogFiles(cfg)
	if err := errors.Join(append([]error{err}, conflicts...)...); err != nil {
		return err
	}
	// Translation needs addresses; a static config keeps the gateways' names for Envoy to resolve.
	var gws []controlplane.Gateway
	var sgws []controlplane.StaticGateway
	for i, g := range cfg.Gateways {
		placeholder := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), uint16(g.Port))
		gws = append(gws, controlplane.Gateway{Name: g.Name, Network: g.Network, Addresses: []netip.AddrPort{placeholder}})
		sgws = append(sgws, controlplane.StaticGateway{Name: g.Name, Address: g.Address, Port: g.Port})
	}
	res, err := controlplane.Translate(cat, daemon.TranslateOptions(cfg, gws))
	if err != nil {
		return err
	}
	_ = reportSkipped(os.Stderr, res.Skipped, false)
	dir, err := filepath.Abs(sdsDir)
	if err != nil {
		return err
	}
	b, err := controlplane.StaticBootstrap(res, controlplane.StaticOptions{AdminAddress: cfg.Envoy.AdminAddress, Gateways: sgws, SDSDir: dir}, cfg.Node.ID, cfg.Node.Cluster)
	if err != nil {
		return err
	}
	if write {
		f := cfg.Identity.Files
		if f == nil {
			return errors.New("--write-sds needs identity.files in the config")
		}
		abs := func(p string) string { a, _ := filepath.Abs(cfg.Path(p)); return a }
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		files, err := controlplane.StaticSecretFiles(abs(f.CertChain), abs(f.PrivateKey), abs(f.Roots))
		if err != nil {
			return err
		}
		for name, doc := range files {
			if err := writeFileAtomic(filepath.Join(dir, name), doc, 0o644); err != nil {
				return err
			}
		}
		slog.Info("wrote SDS files", "dir", dir)
	}
	return printJSON(b)
}

func newBootstrapCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bootstrap",
		Short: "Print an Envoy bootstrap that points at the daemon's xDS socket",
		Long: `Print an Envoy bootstrap (JSON) that takes its configuration from the daemon's xDS socket
(xds.socket), with the node id and cluster of the config: for an Envoy the daemon does not
supervise (dataplane: none).`,
		Example: `  fwdproxy bootstrap --config /etc/fwdproxy/config.yaml > /etc/envoy/bootstrap.json`,
		Args:    noArgs,
	}
	path := configFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		cfg, err := config.Load(*path)
		if err != nil {
			return err
		}
		b, err := controlplane.Bootstrap(controlplane.BootstrapOptions{
			NodeID: cfg.Node.ID, NodeCluster: cfg.Node.Cluster, XDSSocket: cfg.XDSSocket(), AdminAddress: cfg.Envoy.AdminAddress,
			SotW: cfg.Envoy.XDSProtocol == "sotw",
		})
		if err != nil {
			return err
		}
		return printJSON(b)
	}
	return cmd
}

// printJSON prints a proto message as indented Envoy proto-JSON.
func printJSON(m proto.Message) error {
	j, err := controlplane.MarshalJSON(m)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, j, "", "  "); err != nil {
		return err
	}
	buf.WriteByte('\n')
	_, err = os.Stdout.Write(buf.Bytes())
	return err
}

// writeFileAtomic replaces path with data, so a reader (Envoy watching SDS files) never sees a
// half-written file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/fwdproxy/fwdproxy/internal/tlsfiles"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/dataplane"
)

func init() { commands = append(commands, newDataplaneCmd) }

func newDataplaneCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dataplane",
		Short: "Run only the built-in data plane against a daemon's xDS server",
		Long: `Run only the built-in data plane, taking its configuration from a daemon's xDS server: for a
daemon with dataplane: none, e.g. to run the data plane as another user or in another network
namespace. The daemon's Unix socket (xds.socket) by default; its TCP listener (xds.address)
only with a client certificate, since it hands out the fleet's key.`,
		Example: `  fwdproxy dataplane --xds /run/fwdproxy/xds.sock --metrics 127.0.0.1:9103
  fwdproxy dataplane --xds 10.0.1.5:18000 --xds-cert dp.pem --xds-key dp-key.pem --xds-ca xds-ca.pem`,
		Args: noArgs,
	}
	fs := cmd.Flags()
	xds := fs.String("xds", config.DefaultXDSSocket, "the daemon's xDS server: its Unix socket (a path or unix:PATH: xds.socket), or host:port of its TCP listener (xds.address), which needs --xds-cert, --xds-key and --xds-ca")
	cert := fs.String("xds-cert", "", "with a TCP --xds: this data plane's client certificate chain (PEM), signed by the daemon's xds.tls.clientCA")
	key := fs.String("xds-key", "", "with a TCP --xds: the client certificate's private key (PEM)")
	ca := fs.String("xds-ca", "", "with a TCP --xds: the CA bundle that signed the daemon's xDS certificate")
	serverName := fs.String("xds-server-name", "", "with a TCP --xds: the name to verify in the daemon's certificate (default: the host of --xds)")
	host, _ := os.Hostname()
	nodeID := fs.String("node-id", host, "node ID reported to the control plane; the daemon's /ready counts this data plane only under its node.id (default: the host name, like node.id)")
	nodeCluster := fs.String("node-cluster", "fwdproxy", "node cluster reported to the control plane")
	listen := fs.String("listen-address", "", "bind every listener on this IP instead of the configured one")
	metrics := fs.String("metrics", "", "serve /metrics on this address (empty: no metrics)")
	drain := fs.Duration("drain-time", 30*time.Second, "how long removed listeners, and all listeners at shutdown, wait for open connections")
	logFormat := fs.String("log-format", "json", "log format: json or text")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		opts := dataplane.Options{ServerAddress: *xds, NodeID: *nodeID, NodeCluster: *nodeCluster, ListenAddress: *listen, DrainTime: *drain}
		switch {
		case strings.HasPrefix(*xds, "unix:"), strings.HasPrefix(*xds, "/"), strings.HasPrefix(*xds, "."):
			p := strings.TrimPrefix(strings.TrimPrefix(*xds, "unix:"), "//")
			abs, err := filepath.Abs(p)
			if err != nil {
				return fmt.Errorf("--xds %q: %v", *xds, err)
			}
			opts.ServerAddress = abs
		default:
			h, _, err := net.SplitHostPort(*xds)
			if err != nil {
				return fmt.Errorf("--xds %q is neither a socket path (/run/fwdproxy/xds.sock, unix:PATH) nor host:port: %v", *xds, err)
			}
			if *cert == "" || *key == "" || *ca == "" {
				return fmt.Errorf("--xds %s is TCP, which the daemon serves only to clients with a certificate (it hands out the fleet's key): pass --xds-cert, --xds-key and --xds-ca, or use its Unix socket (--xds %s)", *xds, config.DefaultXDSSocket)
			}
			tc, err := tlsfiles.Client(*cert, *key, *ca)
			if err != nil {
				return fmt.Errorf("--xds-cert/--xds-key/--xds-ca: %w", err)
			}
			tc.ServerName = h
			if *serverName != "" {
				tc.ServerName = *serverName
			}
			opts.TLS = tc
		}
		if *listen != "" && net.ParseIP(*listen) == nil {
			return fmt.Errorf("--listen-address %q is not an IP address", *listen)
		}
		log, err := newLogger(*logFormat, *logLevel)
		if err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		var reg *prometheus.Registry
		if *metrics != "" {
			reg = prometheus.NewRegistry()
			lis, err := net.Listen("tcp", *metrics)
			if err != nil {
				return fmt.Errorf("--metrics: %w", err)
			}
			srv := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), ReadHeaderTimeout: 10 * time.Second}
			go func() {
				if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
					log.Error("metrics server failed", "error", err)
				}
			}()
			defer srv.Close()
		}
		opts.Log = log
		if reg != nil {
			opts.Registerer = reg
		}
		log.Info("built-in data plane starting", "xds", opts.ServerAddress, "node", *nodeID, "tls", opts.TLS != nil)
		return dataplane.New(opts).Run(ctx)
	}
	return cmd
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/fwdproxy/fwdproxy/pkg/dataplane"
)

func init() {
	register("dataplane", "run only the built-in data plane against a daemon's xDS server (for a daemon with dataplane: none)", dataplaneCmd)
}

func dataplaneCmd(args []string) error {
	fs := flag.NewFlagSet("dataplane", flag.ContinueOnError)
	xds := fs.String("xds", "127.0.0.1:18000", "the daemon's xDS address (keep it on loopback: it serves the fleet's key over SDS)")
	host, _ := os.Hostname()
	nodeID := fs.String("node-id", host, "node ID reported to the control plane")
	nodeCluster := fs.String("node-cluster", "fwdproxy", "node cluster reported to the control plane")
	listen := fs.String("listen-address", "", "bind every listener on this IP instead of the configured one")
	metrics := fs.String("metrics", "", "serve /metrics on this address (empty: no metrics)")
	drain := fs.Duration("drain-time", 30*time.Second, "how long removed listeners, and all listeners at shutdown, wait for open connections")
	logFormat := fs.String("log-format", "json", "log format: json or text")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, _, err := net.SplitHostPort(*xds); err != nil {
		return fmt.Errorf("--xds %q: %v", *xds, err)
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
	opts := dataplane.Options{ServerAddress: *xds, NodeID: *nodeID, NodeCluster: *nodeCluster, Log: log,
		ListenAddress: *listen, DrainTime: *drain}
	if reg != nil {
		opts.Registerer = reg
	}
	log.Info("built-in data plane starting", "xds", *xds, "node", *nodeID)
	return dataplane.New(opts).Run(ctx)
}

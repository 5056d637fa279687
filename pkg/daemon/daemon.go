// Package daemon wires the pipeline together: sources -> catalog -> translation -> snapshot ->
// xDS server (and the data plane). It owns no logic of its own beyond ordering and readiness.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/dataplane"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
	"github.com/fwdproxy/fwdproxy/pkg/gateways"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

// Daemon is one running fwdproxy instance.
type Daemon struct {
	cfg      *config.Config
	log      *slog.Logger
	Registry *prometheus.Registry
	XDS      *controlplane.Server
	sources  []discovery.Source
	// inproc is the built-in data plane's in-process connection to the xDS server (set by Run).
	inproc *controlplane.InProcessListener
	// envoyUID is the user a supervised Envoy runs as (this daemon's); see isDataPlane.
	envoyUID uint32

	changed chan struct{}
	mu      sync.Mutex
	// catalogs holds each source's latest catalog, by source name, in source order.
	catalogs map[string]*catalog.Catalog
	bundle   *identity.Bundle
	gateways []controlplane.Gateway
	lastErr  error
	// conflicts are the last rebuild's catalog conflicts, logged when they appeared.
	conflicts map[string]bool
	// skipped are the services the latest translation left out (skipped.go).
	skipped []controlplane.SkippedService
	// translated is the catalog the latest translation was of: fwdproxy status lists its
	// services' states (skipped.go).
	translated *catalog.Catalog
	// kube holds the gateways discovered in Kubernetes (kubernetes.go); nil without any.
	kube *gateways.Discovered

	metrics *daemonMetrics
	// translator and builder remember the last rebuild, so the next costs what changed; only
	// rebuildLoop uses them.
	translator controlplane.Translator
	builder    controlplane.Builder
	// merger remembers the last merge of the sources' catalogs, so that one changed entry is
	// merged and checked alone rather than the whole catalog again.
	merger discovery.Merger

	// tuneDataplane, when set (by tests), edits the built-in data plane's options.
	tuneDataplane func(*dataplane.Options)
	// builtin is the in-process data plane (dataplane: builtin), set before Run starts it.
	builtin atomic.Pointer[dataplane.DataPlane]
	// node is this instance's gossip peer, when peers.bind is set (fleet.go).
	node atomic.Pointer[peers.Node]
}

// New builds a daemon from a validated config.
func New(cfg *config.Config, log *slog.Logger) *Daemon {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	d := &Daemon{
		cfg:      cfg,
		log:      log,
		Registry: reg,
		XDS:      controlplane.NewServer(log.With("component", "xds"), reg),
		changed:  make(chan struct{}, 1),
		catalogs: map[string]*catalog.Catalog{},
		metrics:  newDaemonMetrics(reg),
	}
	for _, f := range cfg.Discovery.Files {
		d.sources = append(d.sources, &discovery.File{Path: cfg.Path(f), Options: cfg.CatalogOptions(), Log: log.With("component", "discovery")})
	}
	d.sources = append(d.sources, d.kubernetesSources()...)
	return d
}

// Run serves until ctx is done or a component fails.
func (d *Daemon) Run(ctx context.Context) error {
	xds, err := d.listenXDS()
	if err != nil {
		return err
	}
	metricsLis, err := net.Listen("tcp", d.cfg.Metrics.Address)
	if err != nil {
		xds.close()
		return fmt.Errorf("metrics.address: %w", err)
	}
	bundle, watchIdentity, err := d.identitySource()
	if err != nil {
		xds.close()
		metricsLis.Close()
		return fmt.Errorf("identity: %w", err)
	}
	d.SetIdentity(bundle)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	xds.serve(ctx, g, d)
	g.Go(func() error { return d.serveHTTP(ctx, metricsLis) })
	g.Go(func() error { return watchIdentity(ctx) })
	g.Go(func() error { return d.resolveGateways(ctx) })
	d.startSources(ctx, g)
	g.Go(func() error { return d.rebuildLoop(ctx) })
	if err := d.startDataplane(ctx, g); err != nil {
		cancel() // stop what already started before reporting
		_ = g.Wait()
		return err
	}
	d.log.Info("fwdproxy started", "node", d.cfg.Node.ID, "xds", xds.describe(), "metrics", metricsLis.Addr().String())
	return g.Wait()
}

// SetCatalog records a source's latest catalog.
func (d *Daemon) SetCatalog(source string, c *catalog.Catalog) {
	d.mu.Lock()
	d.catalogs[source] = c
	d.mu.Unlock()
	d.poke()
}

// SetIdentity records a new identity bundle.
func (d *Daemon) SetIdentity(b *identity.Bundle) {
	d.mu.Lock()
	prev := d.bundle
	d.bundle = b
	d.mu.Unlock()
	if prev == nil || prev.Fingerprint() != b.Fingerprint() {
		d.log.Info("identity loaded", "identity", b.String())
	}
	d.metrics.identityExpiry.Set(float64(b.NotAfter().Unix()))
	d.poke()
}

func (d *Daemon) poke() {
	select {
	case d.changed <- struct{}{}:
	default:
	}
}

// rebuildLoop translates whenever an input changes, coalescing bursts.
func (d *Daemon) rebuildLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-d.changed:
		}
		select { // let a burst of changes settle
		case <-ctx.Done():
			return nil
		case <-time.After(50 * time.Millisecond):
		}
		if err := d.rebuild(ctx); err != nil {
			d.metrics.buildErrors.Inc()
			d.log.Error("configuration not updated; still serving the last good one", "error", err)
		}
	}
}

// Inputs returns the merged catalog (not to be modified: it shares services with the next one)
// and the translation options from the current inputs.
func (d *Daemon) Inputs() (*catalog.Catalog, controlplane.Options, *identity.Bundle, []error) {
	d.mu.Lock()
	var cats []*catalog.Catalog
	for _, s := range d.sources {
		cats = append(cats, d.catalogs[s.Name()])
	}
	gws := slices.Clone(d.gateways)
	bundle := d.bundle
	d.mu.Unlock()
	merged, conflicts := d.merger.Merge(d.catalogOptions(gws), cats...)
	return merged, TranslateOptions(d.cfg, gws), bundle, conflicts
}

// TranslateOptions derives translation options from the config and resolved gateways.
func TranslateOptions(cfg *config.Config, gws []controlplane.Gateway) controlplane.Options {
	o := cfg.Upstream.Outlier
	opts := controlplane.Options{
		ListenAddress:  cfg.Listen.Address,
		Gateways:       gws,
		ConnectTimeout: cfg.Upstream.ConnectTimeout,
		Outlier: controlplane.Outlier{
			ConsecutiveErrors: o.ConsecutiveErrors, Interval: o.Interval,
			BaseEjectionTime: o.BaseEjectionTime, MaxEjectionPercent: o.MaxEjectionPercent,
		},
		AccessLog: *cfg.Listen.AccessLog,
		Limits: controlplane.Limits{
			MaxRequestHeadersKB: cfg.Listen.MaxRequestHeadersKB,
			MaxHeadersCount:     cfg.Listen.MaxHeadersCount,
			MaxConnections:      cfg.Listen.MaxConnections,
		},
		Reverse: reverseOptions(cfg), // reverse.go
	}
	if pm := cfg.Mesh.PeerMetadata; pm.Enabled {
		opts.PeerMetadata = &controlplane.PeerMetadata{
			WorkloadName: pm.WorkloadName, Namespace: pm.Namespace,
			CanonicalService: pm.CanonicalService, CanonicalRevision: pm.CanonicalRevision,
			App: pm.Labels.App, Version: pm.Labels.Version, ClusterID: pm.ClusterID,
		}
	}
	return opts
}

// logConflicts logs a conflict when it appears, not at every rebuild while it lasts: an operator
// entry overriding a discovered service would otherwise log again with every change to the
// catalog. Called by the rebuild loop only.
func (d *Daemon) logConflicts(conflicts []error) {
	now := make(map[string]bool, len(conflicts))
	for _, c := range conflicts {
		msg := c.Error()
		if !d.conflicts[msg] && !now[msg] {
			d.log.Warn("catalog conflict", "error", c)
		}
		now[msg] = true
	}
	d.conflicts = now
}

func (d *Daemon) rebuild(ctx context.Context) error {
	cat, opts, bundle, conflicts := d.Inputs()
	d.logConflicts(conflicts)
	d.metrics.catalogServices.Set(float64(len(cat.Services)))
	ports := 0
	for _, s := range cat.Services {
		ports += len(s.Ports)
	}
	d.metrics.catalogPorts.Set(float64(ports))
	cat, bundle = d.withholdIfExpired(cat, bundle) // identity.go: an expired identity carries no traffic
	if bundle == nil {
		opts.Reverse = nil // nor does the inbound listener answer with no (valid) certificate to present
	}
	if len(opts.Gateways) == 0 {
		return d.setErr(errors.New("no east-west gateway address resolved yet"))
	}
	res, err := d.translator.Translate(cat, opts)
	if err != nil {
		return d.setErr(fmt.Errorf("translate: %w", err))
	}
	snap, err := d.builder.Build(res, bundle)
	if err != nil {
		return d.setErr(fmt.Errorf("snapshot: %w", err))
	}
	d.recordSkipped(cat, res.Skipped) // left out of what is served, and reported; the rest is served
	if cur := d.XDS.Current(); cur != nil && cur.ConfigVersion == snap.ConfigVersion && cur.SecretsVersion == snap.SecretsVersion {
		return d.setErr(nil)
	}
	if err := d.XDS.Set(ctx, snap); err != nil {
		return d.setErr(err)
	}
	d.log.Info("serving configuration", "config_version", snap.ConfigVersion, "secrets_version", snap.SecretsVersion,
		"services", len(cat.Services)-len(res.Skipped), "skipped", len(res.Skipped), "listeners", len(res.Listeners), "clusters", len(res.Clusters))
	return d.setErr(nil)
}

func (d *Daemon) setErr(err error) error {
	d.mu.Lock()
	d.lastErr = err
	d.mu.Unlock()
	return err
}

// resolveGateways runs the gateway source (pkg/gateways) over the configured and discovered
// gateways; a change rebuilds the configuration.
func (d *Daemon) resolveGateways(ctx context.Context) error {
	r := &gateways.Resolver{Config: d.cfg, Discovered: d.kube, Log: d.log}
	return r.Run(ctx, func(gws []controlplane.Gateway) {
		d.mu.Lock()
		changed := !slices.EqualFunc(gws, d.gateways, func(a, b controlplane.Gateway) bool {
			return a.Name == b.Name && a.Priority == b.Priority && slices.Equal(a.Addresses, b.Addresses)
		})
		d.gateways = gws
		d.mu.Unlock()
		if changed {
			d.poke()
		}
	})
}

// Ready reports whether this instance can carry traffic: it has an identity, every catalog
// source has reported, a snapshot is served, and a data plane acknowledged it.
func (d *Daemon) Ready() (bool, string) {
	d.mu.Lock()
	bundle, lastErr := d.bundle, d.lastErr
	missing := ""
	for _, s := range d.sources {
		if d.catalogs[s.Name()] == nil {
			missing = s.Name()
		}
	}
	d.mu.Unlock()
	switch {
	case bundle == nil:
		return false, "no identity yet"
	case bundle.Expired(time.Now()):
		return false, "identity expired at " + bundle.NotAfter().UTC().Format(time.RFC3339)
	case d.node.Load() != nil && !d.node.Load().Health().Synced:
		// Ready without the fleet's state would let the load balancer send traffic to an
		// instance that lacks services the rest of the fleet serves.
		return false, "waiting for the fleet's state: no peer reached yet (peers.seeds, the gossip port, peers.keyring)"
	case missing != "":
		return false, "catalog source " + missing + " has not reported yet"
	case d.XDS.Current() == nil:
		if lastErr != nil {
			return false, "no configuration built: " + lastErr.Error()
		}
		return false, "no configuration built yet"
	}
	// A data plane that rejects a newer configuration keeps serving the last one it accepted, so
	// the instance still carries traffic (and the NACK is alerted on). Taking it out of the load
	// balancer instead would take out the whole fleet at once, since every peer serves the same
	// configuration, and the Auto Scaling group would replace every instance.
	st := d.XDS.Status()
	if dp := d.builtin.Load(); dp != nil {
		// The built-in data plane runs in this process, so it says itself whether it serves: it
		// keeps its listeners while its stream is down, e.g. when it reconnects after a response
		// it could not receive, which the xDS server sees only as a stream that closed.
		switch ds := dp.Status(); {
		case !ds.Serving:
			return false, "the data plane has not applied a configuration yet"
		case st.AckedCurrent == 0 && ds.LastRejection != "":
			return true, "ready on an earlier configuration: the data plane has not taken the current one (last rejection: " + ds.LastRejection + ")"
		case st.AckedCurrent == 0:
			return true, "ready on an earlier configuration: the data plane has not acknowledged the current one yet"
		}
		return true, "ready"
	}
	switch {
	case st.AckedAny == 0:
		return false, "no data plane has acknowledged a configuration yet"
	case st.AckedCurrent == 0:
		return true, "ready on an earlier configuration: no data plane has acknowledged the current one yet"
	}
	return true, "ready"
}

func (d *Daemon) serveHTTP(ctx context.Context, lis net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		ok, why := d.Ready()
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, why)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shut)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

type daemonMetrics struct {
	catalogServices prometheus.Gauge
	catalogPorts    prometheus.Gauge
	buildErrors     prometheus.Counter
	identityExpiry  prometheus.Gauge
	servicesSkipped *prometheus.GaugeVec
	adminRefused    *prometheus.CounterVec
}

func newDaemonMetrics(reg prometheus.Registerer) *daemonMetrics {
	m := &daemonMetrics{
		catalogServices: prometheus.NewGauge(prometheus.GaugeOpts{Name: "fwdproxy_catalog_services", Help: "Services in the merged catalog."}),
		catalogPorts:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "fwdproxy_catalog_ports", Help: "Service ports in the merged catalog."}),
		buildErrors:     prometheus.NewCounter(prometheus.CounterOpts{Name: "fwdproxy_config_build_errors_total", Help: "Catalog changes that could not be turned into a valid snapshot."}),
		identityExpiry:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "fwdproxy_identity_expiry_timestamp_seconds", Help: "When the fleet identity certificate expires."}),
		adminRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fwdproxy_admin_requests_refused_total",
			Help: "Admin API requests or connections refused: unauthorized (no or a wrong token), tls (failed handshake)."}, []string{"reason"}),
	}
	reg.MustRegister(m.catalogServices, m.catalogPorts, m.buildErrors, m.identityExpiry, m.adminRefused)
	m.servicesSkipped = newSkippedGauge(reg)
	m.adminRefused.WithLabelValues("unauthorized")
	m.adminRefused.WithLabelValues("tls")
	return m
}

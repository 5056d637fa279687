package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/fwdproxy/fwdproxy/internal/backoff"
	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

// startSources starts discovery and the admin API.
//
// Without gossip (peers.bind empty) every configured source runs here and reports into the
// daemon's catalog inputs. With gossip, the pipeline's inputs are the fleet store instead: the
// operator entries first (they override discovery for the same host), then each configured
// source's catalog as the leader last wrote it. Only the leader (the live member with the lowest
// name) runs the configured sources, writing their catalogs and discovered gateways into the
// store, so the Kubernetes API sees one watcher per fleet rather than one per instance; when
// the leader fails another peer takes over once failure detection declares it dead.
func (d *Daemon) startSources(ctx context.Context, g *errgroup.Group) {
	var node *peers.Node
	if d.cfg.Peers.Bind == "" {
		// A fleet of one leads itself; the gauge keeps dashboards uniform.
		_ = d.Registry.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fwdproxy_fleet_leader", Help: "1 on the peer that runs discovery for the fleet.",
		}, func() float64 { return 1 }))
		d.runSources(ctx, g, d.sources)
	} else {
		var err error
		if node, err = d.startPeers(); err != nil {
			g.Go(func() error { return err })
			return
		}
		d.node.Store(node)
		g.Go(func() error {
			<-ctx.Done()
			return node.Close()
		})
		d.mu.Lock()
		local := d.sources
		names := make([]string, len(local))
		for i, s := range local {
			names[i] = d.fleetSourceName(i, s)
		}
		d.sources = node.Sources(names)
		fleet := d.sources
		d.mu.Unlock()
		d.shareGateways(local, node)
		d.runSources(ctx, g, fleet)
		g.Go(func() error { return d.leadDiscovery(ctx, node, local, names) })
		g.Go(func() error { return d.followGateways(ctx, node) })
	}
	if err := d.startAdmin(ctx, g, node); err != nil {
		g.Go(func() error { return err })
	}
}

// fleetSourceName names a configured source the same way on every peer: a catalog file by the
// path written in the config (peers may resolve it under different directories), others by
// their own name.
func (d *Daemon) fleetSourceName(i int, s discovery.Source) string {
	if _, ok := s.(*discovery.File); ok && i < len(d.cfg.Discovery.Files) {
		return "file:" + d.cfg.Discovery.Files[i]
	}
	return s.Name()
}

// runSources runs sources, each reporting into the daemon's catalog inputs.
func (d *Daemon) runSources(ctx context.Context, g *errgroup.Group, sources []discovery.Source) {
	for _, src := range sources {
		g.Go(func() error {
			err := src.Run(ctx, func(c *catalog.Catalog) { d.SetCatalog(src.Name(), c) })
			if err != nil && ctx.Err() == nil {
				return fmt.Errorf("discovery %s: %w", src.Name(), err)
			}
			return nil
		})
	}
}

// startPeers joins the fleet.
func (d *Daemon) startPeers() (*peers.Node, error) {
	pc := d.cfg.Peers
	log := d.log.With("component", "peers")
	// The store checks entries without this instance's own ports: a peer configured with other
	// ports must not make the stores differ. The merged catalog checks them here (Inputs).
	storeOpts := d.cfg.CatalogOptions()
	storeOpts.Reserved = nil
	cfg := peers.Config{
		Name: d.cfg.Node.ID, Bind: pc.Bind, Advertise: pc.Advertise, Seeds: pc.Seeds,
		Profile: pc.Timing, CatalogOptions: storeOpts,
		Store: peers.StoreOptions{TombstoneTTL: pc.TombstoneTTL},
		Log:   log, Registerer: d.Registry,
	}
	if pc.Keyring != "" {
		keys, err := peers.LoadKeyring(d.cfg.Path(pc.Keyring), func(msg string) { log.Warn(msg) })
		if err != nil {
			return nil, fmt.Errorf("peers.keyring: %w", err)
		}
		cfg.Keys = keys
	} else {
		log.Warn("gossip is not encrypted (peers.allowUnencrypted); any host that reaches peers.bind can join and change the fleet configuration")
	}
	if a := pc.AWS; a != nil {
		portOf := pc.Bind
		if pc.Advertise != "" {
			portOf = pc.Advertise
		}
		_, p, _ := net.SplitHostPort(portOf)
		port, _ := strconv.Atoi(p)
		aws := &peers.AWS{Region: a.Region, AutoScalingGroup: a.AutoScalingGroup, Endpoint: a.Endpoint, Port: port, Log: log}
		cfg.Discover = aws.Discover
	}
	node, err := peers.Start(cfg)
	if err != nil {
		return nil, fmt.Errorf("peers.bind: %w", err)
	}
	log.Info("gossip started", "addr", node.Addr(), "encrypted", len(cfg.Keys) > 0, "seeds", len(pc.Seeds), "aws", pc.AWS != nil)
	return node, nil
}

// leadDiscovery runs the configured sources while this peer leads, writing their catalogs into
// the fleet store. A source that fails is retried: giving up would leave the fleet without
// discovery until the leader changes.
func (d *Daemon) leadDiscovery(ctx context.Context, node *peers.Node, sources []discovery.Source, names []string) error {
	var stop func()
	defer func() {
		if stop != nil {
			stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case lead := <-node.LeaderChanges():
			switch {
			case lead && stop == nil:
				stop = d.startLeading(ctx, node, sources, names)
			case !lead && stop != nil:
				d.log.Info("another peer now runs discovery; stopping the sources here")
				stop()
				stop = nil
			}
		}
	}
}

// startLeading runs the sources until the returned function is called.
func (d *Daemon) startLeading(ctx context.Context, node *peers.Node, sources []discovery.Source, names []string) func() {
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i, src := range sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.runLeaderSource(lctx, node, src, names[i])
		}()
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

func (d *Daemon) runLeaderSource(ctx context.Context, node *peers.Node, src discovery.Source, name string) {
	bo := backoff.New(backoff.Spread(time.Second, time.Minute))
	for ctx.Err() == nil {
		err := src.Run(ctx, func(c *catalog.Catalog) { node.SetDiscovered(name, c) })
		if ctx.Err() != nil {
			return
		}
		retry := bo.Next()
		d.log.Error("discovery source failed on the fleet leader; retrying", "source", src.Name(), "error", err, "retry_in", retry)
		backoff.Sleep(ctx, retry)
	}
}

// shareGateways makes the Kubernetes sources also publish the gateways they discover.
func (d *Daemon) shareGateways(sources []discovery.Source, node *peers.Node) {
	for _, s := range sources {
		ks, ok := s.(*kubeSource)
		if !ok {
			continue
		}
		local := ks.Kubernetes.OnGateway
		ks.Kubernetes.OnGateway = func(g discovery.DiscoveredGateway) {
			if local != nil {
				local(g)
			}
			err := node.SetGateway(peers.Gateway{Name: g.Name, Network: g.Network, Port: g.Port, Addresses: g.Addresses})
			if err != nil {
				d.log.Error("discovered gateway not shared with the fleet", "gateway", g.Name, "error", err)
			}
		}
	}
}

// followGateways feeds the gateways the leader shared into this peer's gateway resolver.
func (d *Daemon) followGateways(ctx context.Context, node *peers.Node) error {
	if d.kube == nil {
		return nil
	}
	for {
		changed := node.Store().Changed()
		for _, g := range node.Gateways() {
			dg := discovery.DiscoveredGateway{Name: g.Name, Network: g.Network, Port: g.Port, Addresses: g.Addresses}
			cur, ok := d.kube.Get(g.Name)
			if !ok || cur.Network != dg.Network || cur.Port != dg.Port || !slices.Equal(cur.Addresses, dg.Addresses) {
				d.kube.Set(dg)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// Identity is the identity bundle currently served (nil before the first one).
func (d *Daemon) Identity() *identity.Bundle {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.bundle
}

// FleetStatus is what fwdproxy status shows: this instance, and with gossip every member's
// advertised configuration digest.
func (d *Daemon) FleetStatus(node *peers.Node) admin.Status {
	ok, why := d.Ready()
	st := admin.Status{Node: d.cfg.Node.ID, Ready: ok, ReadyReason: why, Leader: true, Converged: true, Skipped: d.skippedStatus(), Services: d.servicesStatus()}
	if cur := d.XDS.Current(); cur != nil {
		st.ConfigVersion = cur.ConfigVersion
	}
	st.Kubernetes = d.kubernetesStatus()
	if b := d.Identity(); b != nil {
		st.Identity = &admin.Identity{SPIFFEID: b.SPIFFEID, NotAfter: b.NotAfter().UTC()}
	}
	if node != nil {
		st.Gossip, st.Leader = true, node.Leader()
		st.Digest, st.Entries = node.Digest()
		st.Members = node.Members()
		h := node.Health()
		st.Fleet, st.Converged = &h, h.Converged
	}
	return st
}

// startAdmin serves the admin API on its Unix socket (callers known by their user: root, the
// daemon's user, admin.group) and, with admin.address, on TCP with the named tokens of
// admin.tokenFile and/or the client certificates of admin.tls (config validation refuses TCP with
// neither, loopback included).
func (d *Daemon) startAdmin(ctx context.Context, g *errgroup.Group, node *peers.Node) error {
	ac := d.cfg.Admin
	gid, err := localsock.LookupGroup(ac.Group)
	if err != nil {
		return fmt.Errorf("admin.group: %w", err)
	}
	srv := &admin.Server{
		Status:  func() admin.Status { return d.FleetStatus(node) },
		Local:   localsock.Policy{UID: uint32(os.Geteuid()), GID: gid, Field: "admin.group"},
		Catalog: d.cfg.CatalogOptions(),
		Log:     d.log.With("component", "admin"),
		Refused: func(reason string) { d.metrics.adminRefused.WithLabelValues(reason).Inc() },
	}
	if node != nil {
		srv.Fleet = node
	}
	// Alone, the API only reports status: not worth refusing to carry traffic for.
	unavailable := func(err error) error {
		if node == nil {
			d.log.Error("admin API not started; fwdproxy status will not reach this instance", "error", err)
			return nil
		}
		return err
	}
	sock, err := localsock.Listen(d.cfg.AdminSocket(), gid)
	if err != nil {
		return unavailable(fmt.Errorf("admin.socket: %w", err))
	}
	d.log.Info("admin API listening", "socket", d.cfg.AdminSocket(), "group", ac.Group)
	g.Go(func() error { return srv.ServeSocket(ctx, sock) })
	if ac.Address == "" {
		return nil
	}
	if ac.TokenFile != "" {
		b, err := os.ReadFile(d.cfg.Path(ac.TokenFile))
		if err != nil {
			return fmt.Errorf("admin.tokenFile: %w", err)
		}
		if srv.Tokens, err = admin.ParseTokens(b); err != nil {
			return fmt.Errorf("admin.tokenFile %s: %w", ac.TokenFile, err)
		}
	}
	var tlsCfg *tls.Config
	if t := ac.TLS; t != nil {
		if tlsCfg, err = admin.ServerTLS(d.cfg.Path(t.CertChain), d.cfg.Path(t.PrivateKey), d.cfg.Path(t.ClientCA)); err != nil {
			return err
		}
	}
	if len(srv.Tokens) == 0 && tlsCfg == nil {
		return errors.New("admin.address needs admin.tokenFile or admin.tls: a TCP admin API authenticates every caller, loopback included")
	}
	lis, err := net.Listen("tcp", ac.Address)
	if err != nil {
		return unavailable(fmt.Errorf("admin.address: %w", err))
	}
	if tlsCfg != nil {
		lis = tls.NewListener(lis, tlsCfg)
	}
	d.log.Info("admin API listening", "addr", lis.Addr().String(), "tokens", len(srv.Tokens), "mtls", tlsCfg != nil)
	g.Go(func() error { return srv.Serve(ctx, lis) })
	return nil
}

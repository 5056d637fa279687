// Package gateways is the source of the east-west gateways' addresses: the configured gateways
// and those discovered in Kubernetes (or shared by the fleet's leader), resolved to IPs now,
// every 30s and whenever a discovered gateway changes. A failed lookup keeps the gateway's last
// known addresses. Its output feeds translation beside the catalog.
package gateways

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
)

// Discovered holds the east-west gateways discovered in Kubernetes clusters, by name. The
// Resolver treats them like configured gateways, and is woken when they change.
type Discovered struct {
	mu      sync.Mutex
	found   map[string]discovery.DiscoveredGateway
	changed chan struct{}
}

// NewDiscovered is an empty set of discovered gateways.
func NewDiscovered() *Discovered {
	return &Discovered{found: map[string]discovery.DiscoveredGateway{}, changed: make(chan struct{}, 1)}
}

// Set records a discovered gateway and wakes the Resolver.
func (k *Discovered) Set(g discovery.DiscoveredGateway) {
	k.mu.Lock()
	k.found[g.Name] = g
	k.mu.Unlock()
	select {
	case k.changed <- struct{}{}:
	default:
	}
}

// Get is the discovered gateway of that name.
func (k *Discovered) Get(name string) (discovery.DiscoveredGateway, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	g, ok := k.found[name]
	return g, ok
}

// wake fires when a discovered gateway changes; nil (never) without Kubernetes discovery.
func (k *Discovered) wake() <-chan struct{} {
	if k == nil {
		return nil
	}
	return k.changed
}

// Target is a gateway to resolve: a configured one (one address) or a discovered one (the
// load balancer's IPs and host names).
type Target struct {
	Name, Network  string
	Port, Priority uint32
	Hosts          []string
}

// Targets lists the configured gateways, then the discovered ones.
func Targets(cfg *config.Config, found *Discovered) []Target {
	var out []Target
	for _, g := range cfg.Gateways {
		out = append(out, Target{Name: g.Name, Network: g.Network, Port: g.Port, Priority: g.Priority, Hosts: []string{g.Address}})
	}
	if found == nil {
		return out
	}
	found.mu.Lock()
	defer found.mu.Unlock()
	for _, k := range cfg.Discovery.Kubernetes {
		if !k.Gateway.Enabled() {
			continue
		}
		if g, ok := found.found[k.Gateway.Name]; ok {
			out = append(out, Target{Name: g.Name, Network: g.Network, Port: g.Port, Priority: k.Gateway.Priority, Hosts: g.Addresses})
		}
	}
	return out
}

// Resolve looks up every host of the gateway; any failure keeps the gateway's last known addresses.
func (t Target) Resolve(ctx context.Context) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, h := range t.Hosts {
		addrs, err := Resolve(ctx, h, uint16(t.Port))
		if err != nil {
			return nil, err
		}
		out = append(out, addrs...)
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return slices.Compact(out), nil
}

// Resolve turns a host (an IP or a DNS name) and port into sorted addresses.
func Resolve(ctx context.Context, host string, port uint16) ([]netip.AddrPort, error) {
	if ip, err := netip.ParseAddr(host); err == nil {
		return []netip.AddrPort{netip.AddrPortFrom(ip, port)}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	out := make([]netip.AddrPort, 0, len(ips))
	for _, ip := range ips {
		out = append(out, netip.AddrPortFrom(ip.Unmap(), port))
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out, nil
}

// Resolver resolves the configured and discovered gateways.
type Resolver struct {
	Config *config.Config
	// Discovered are the gateways found in Kubernetes; nil without Kubernetes discovery.
	Discovered *Discovered
	Log        *slog.Logger
}

// Run resolves the gateways now, every 30s and whenever a discovered gateway changes, and
// passes the gateways that have addresses to update each time, until ctx ends.
func (r *Resolver) Run(ctx context.Context, update func([]controlplane.Gateway)) error {
	known := map[string][]netip.AddrPort{}
	for {
		targets := Targets(r.Config, r.Discovered)
		for _, g := range targets {
			addrs, err := g.Resolve(ctx)
			if err != nil {
				r.Log.Warn("cannot resolve gateway; keeping its last known addresses", "gateway", g.Name, "address", g.Hosts, "error", err)
				continue
			}
			known[g.Name] = addrs
		}
		var gws []controlplane.Gateway
		for _, g := range targets {
			if addrs := known[g.Name]; len(addrs) > 0 {
				gws = append(gws, controlplane.Gateway{Name: g.Name, Network: g.Network, Addresses: addrs, Priority: g.Priority})
			}
		}
		update(gws)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(30 * time.Second):
		case <-r.Discovered.wake():
		}
	}
}

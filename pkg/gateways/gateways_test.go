package gateways

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
)

// The configured gateways resolve at once; a discovered one is added, with its cluster's
// priority, as soon as it is set, without waiting for the periodic re-resolution.
func TestResolverConfiguredThenDiscovered(t *testing.T) {
	cfg := &config.Config{
		Gateways: []config.Gateway{{Name: "west", Address: "127.0.0.1", Port: 15443, Priority: 1}},
		Discovery: config.Discovery{Kubernetes: []config.KubernetesCluster{
			{Name: "primary", Gateway: config.KubernetesGateway{Name: "primary", Priority: 2}},
		}},
	}
	found := NewDiscovered()
	r := &Resolver{Config: cfg, Discovered: found, Log: slog.New(slog.DiscardHandler)}
	updates := make(chan []controlplane.Gateway, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx, func(g []controlplane.Gateway) { updates <- g }) }()
	defer func() { cancel(); <-done }()

	next := func(what string) []controlplane.Gateway {
		t.Helper()
		select {
		case g := <-updates:
			return g
		case <-time.After(15 * time.Second):
			t.Fatalf("no update: %s", what)
			return nil
		}
	}
	west := controlplane.Gateway{Name: "west", Addresses: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15443")}, Priority: 1}
	if got := next("configured"); !slices.EqualFunc(got, []controlplane.Gateway{west}, sameGateway) {
		t.Fatalf("configured gateways: %+v", got)
	}
	found.Set(discovery.DiscoveredGateway{Name: "primary", Port: 15443, Addresses: []string{"127.0.0.3", "127.0.0.2", "127.0.0.3"}})
	primary := controlplane.Gateway{Name: "primary", Priority: 2, Addresses: []netip.AddrPort{
		netip.MustParseAddrPort("127.0.0.2:15443"), netip.MustParseAddrPort("127.0.0.3:15443")}}
	if got := next("discovered"); !slices.EqualFunc(got, []controlplane.Gateway{west, primary}, sameGateway) {
		t.Fatalf("with the discovered gateway: %+v", got)
	}
	if g, ok := found.Get("primary"); !ok || g.Port != 15443 {
		t.Errorf("Get(primary) = %+v, %v", g, ok)
	}
}

func sameGateway(a, b controlplane.Gateway) bool {
	return a.Name == b.Name && a.Network == b.Network && a.Priority == b.Priority && slices.Equal(a.Addresses, b.Addresses)
}

func TestResolveLiteral(t *testing.T) {
	got, err := Resolve(context.Background(), "::1", 15443)
	if err != nil || !slices.Equal(got, []netip.AddrPort{netip.MustParseAddrPort("[::1]:15443")}) {
		t.Fatalf("Resolve(::1) = %v, %v", got, err)
	}
}

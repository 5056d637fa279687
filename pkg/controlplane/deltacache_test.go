package controlplane

import (
	"context"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// deltaClient is a delta ADS stream that holds what it was sent, as a data plane does.
type deltaClient struct {
	t      *testing.T
	stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	held   map[string]map[string]string // type URL -> name -> version
}

func dialDelta(t *testing.T, addr string) *deltaClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(func() { cancel(); conn.Close() })
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &deltaClient{t: t, stream: stream, held: map[string]map[string]string{}}
}

func (c *deltaClient) send(r *discovery.DeltaDiscoveryRequest) {
	c.t.Helper()
	r.Node = &core.Node{Id: "delta-test"}
	if err := c.stream.Send(r); err != nil {
		c.t.Fatal(err)
	}
}

// delta is one response's names, sorted.
type delta struct{ updated, removed []string }

// recvRaw takes the next response (bounded by the stream's deadline) and applies it.
func (c *deltaClient) recvRaw() (*discovery.DeltaDiscoveryResponse, delta) {
	c.t.Helper()
	r, err := c.stream.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	typ := r.GetTypeUrl()
	if c.held[typ] == nil {
		c.held[typ] = map[string]string{}
	}
	var d delta
	for _, res := range r.GetResources() {
		d.updated = append(d.updated, res.GetName())
		c.held[typ][res.GetName()] = res.GetVersion()
	}
	for _, name := range r.GetRemovedResources() {
		d.removed = append(d.removed, name)
		delete(c.held[typ], name)
	}
	slices.Sort(d.updated)
	slices.Sort(d.removed)
	return r, d
}

func (c *deltaClient) ack(r *discovery.DeltaDiscoveryResponse) {
	c.t.Helper()
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce()})
}

// recv takes one response of each of typs, in any order (one Set answers every watch), and ACKs
// each.
func (c *deltaClient) recv(typs ...string) map[string]delta {
	c.t.Helper()
	got := map[string]delta{}
	for len(got) < len(typs) {
		r, d := c.recvRaw()
		if !slices.Contains(typs, r.GetTypeUrl()) {
			c.t.Fatalf("response of %s, want %v", r.GetTypeUrl(), typs)
		}
		if _, dup := got[r.GetTypeUrl()]; dup {
			c.t.Fatalf("two responses of %s", r.GetTypeUrl())
		}
		got[r.GetTypeUrl()] = d
		c.ack(r)
	}
	return got
}

// diffVersions is what a client holding from needs to hold to: the names new or changed, and
// the names gone, sorted.
func diffVersions(from, to map[string]string) (updated, removed []string) {
	for name, v := range to {
		if from[name] != v {
			updated = append(updated, name)
		}
	}
	for name := range from {
		if _, ok := to[name]; !ok {
			removed = append(removed, name)
		}
	}
	slices.Sort(updated)
	slices.Sort(removed)
	return updated, removed
}

// TestDeltaSendsOnlyWhatChanged checks that a one-service change reaches a delta stream (clusters
// wildcard, endpoints by name, as Envoy subscribes) as that service's resources only, a removed
// service as removals, and that a client reconnecting with initial_resource_versions gets
// exactly the difference from what it holds.
func TestDeltaSendsOnlyWhatChanged(t *testing.T) {
	s := startServer(t)
	cat := largeCatalog(50)
	build := serveCatalog(t, s, cat)
	versions := func(snap *Snapshot, typ string) map[string]string { return maps.Clone(snap.Cache.GetVersionMap(typ)) }
	sent := func() float64 {
		return testutil.ToFloat64(s.metrics.resources.WithLabelValues("cluster")) + testutil.ToFloat64(s.metrics.resources.WithLabelValues("endpoint"))
	}

	first := build()
	c := dialDelta(t, s.addr)
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType})
	if got := c.recv(resource.ClusterType)[resource.ClusterType].updated; len(got) != len(first.Cache.GetVersionMap(resource.ClusterType)) {
		t.Fatalf("first response: %d clusters, want all %d", len(got), len(first.Cache.GetVersionMap(resource.ClusterType)))
	}
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: slices.Sorted(maps.Keys(first.Cache.GetVersionMap(resource.EndpointType)))})
	if got := c.recv(resource.EndpointType)[resource.EndpointType].updated; len(got) != len(first.Cache.GetVersionMap(resource.EndpointType)) {
		t.Fatalf("first response: %d endpoints, want all %d", len(got), len(first.Cache.GetVersionMap(resource.EndpointType)))
	}

	// One service changes: only its clusters and their endpoints are sent.
	host := cat.Services[7].Host
	cat.Services[7].Identities = []string{"spiffe://cluster.local/ns/x/sa/changed"}
	before := sent()
	second := build()
	got := c.recv(resource.ClusterType, resource.EndpointType)
	for _, typ := range []string{resource.ClusterType, resource.EndpointType} {
		updated, removed := got[typ].updated, got[typ].removed
		want, _ := diffVersions(versions(first, typ), versions(second, typ))
		if len(updated) == 0 || !slices.Equal(updated, want) || len(removed) != 0 {
			t.Fatalf("%s after a one-service change: sent %v, removed %v; want sent %v", TypeName(typ), updated, removed, want)
		}
		if b := slices.Compact(slices.Sorted(slices.Values(second.changed[typ]))); second.base != first.Cache || !slices.Equal(b, want) {
			t.Fatalf("%s the Builder reports changed: %v, want %v", TypeName(typ), b, want)
		}
		for _, name := range updated {
			if !strings.HasSuffix(name, "|"+host) {
				t.Fatalf("%s %q sent for a change to %s only", TypeName(typ), name, host)
			}
		}
		if !maps.Equal(c.held[typ], versions(second, typ)) {
			t.Fatalf("%s held after the change differ from the snapshot's", TypeName(typ))
		}
	}
	if got := sent() - before; got != 4 { // two ports: two clusters, two endpoints
		t.Fatalf("fwdproxy_xds_resources_sent_total grew by %v for one service, want 4", got)
	}

	// A service goes: its clusters and endpoints are removed, nothing else is sent.
	gone := cat.Services[20].Host
	cat.Services = slices.Delete(cat.Services, 20, 21)
	third := build()
	got = c.recv(resource.ClusterType, resource.EndpointType)
	for _, typ := range []string{resource.ClusterType, resource.EndpointType} {
		updated, removed := got[typ].updated, got[typ].removed
		_, want := diffVersions(versions(second, typ), versions(third, typ))
		if len(removed) != 2 || !slices.Equal(removed, want) || len(updated) != 0 {
			t.Fatalf("%s after a removal: sent %v, removed %v; want removed %v", TypeName(typ), updated, removed, want)
		}
		if b := slices.Compact(slices.Sorted(slices.Values(third.changed[typ]))); !slices.Equal(b, want) {
			t.Fatalf("%s the Builder reports changed: %v, want %v", TypeName(typ), b, want)
		}
		for _, name := range removed {
			if !strings.HasSuffix(name, "|"+gone) {
				t.Fatalf("%s %q removed for %s going", TypeName(typ), name, gone)
			}
		}
		if !maps.Equal(c.held[typ], versions(third, typ)) {
			t.Fatalf("%s held after the removal differ from the snapshot's", TypeName(typ))
		}
	}

	// A client that held the first snapshot reconnects with what it holds: it gets exactly the
	// difference (the changed service's resources, the removed service's removals).
	r := dialDelta(t, s.addr)
	for _, typ := range []string{resource.ClusterType, resource.EndpointType} {
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: typ, InitialResourceVersions: versions(first, typ)}
		if typ == resource.EndpointType {
			req.ResourceNamesSubscribe = slices.Sorted(maps.Keys(third.Cache.GetVersionMap(typ)))
			// It also held the removed service's endpoints (subscribed until its cluster went).
			req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, slices.DeleteFunc(slices.Sorted(maps.Keys(first.Cache.GetVersionMap(typ))), func(n string) bool {
				_, ok := third.Cache.GetVersionMap(typ)[n]
				return ok
			})...)
		}
		r.send(req)
		d := r.recv(typ)[typ]
		updated, removed := d.updated, d.removed
		wantUpdated, wantRemoved := diffVersions(versions(first, typ), versions(third, typ))
		if !slices.Equal(updated, wantUpdated) || !slices.Equal(removed, wantRemoved) {
			t.Fatalf("%s on reconnect: sent %v, removed %v; want sent %v, removed %v", TypeName(typ), updated, removed, wantUpdated, wantRemoved)
		}
	}

	// No change, no response: the next one a stream sees is the next change's.
	cat.Services[3].Identities = []string{"spiffe://cluster.local/ns/x/sa/again"}
	fourth := build()
	updated := c.recv(resource.ClusterType, resource.EndpointType)[resource.ClusterType].updated
	if want, _ := diffVersions(versions(third, resource.ClusterType), versions(fourth, resource.ClusterType)); !slices.Equal(updated, want) {
		t.Fatalf("clusters after the second change: sent %v, want %v", updated, want)
	}
}

// TestDeltaFullDiffWhenBehindTheLog checks that a stream whose state is older than the change
// log still converges: a client slow to ACK while more changes than the log holds are set gets
// a full diff when it does.
func TestDeltaFullDiffWhenBehindTheLog(t *testing.T) {
	s := startServer(t)
	cat := largeCatalog(5)
	build := serveCatalog(t, s, cat)
	build()
	c := dialDelta(t, s.addr)
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType})
	c.recv(resource.ClusterType)
	cat.Services[2].Identities = []string{"spiffe://cluster.local/ns/x/sa/first"}
	second := build()
	r, _ := c.recvRaw() // not ACKed yet: the stream has no watch while the next changes land
	var last *Snapshot
	for i := 0; i < deltaLogLength+2; i++ {
		cat.Services[3].Identities = []string{"spiffe://cluster.local/ns/x/sa/v" + strconv.Itoa(i)}
		last = build()
	}
	s.delta.mu.Lock()
	oldest := s.delta.log[0].seq
	s.delta.mu.Unlock()
	if oldest <= 2 {
		t.Fatalf("the change log still holds set %d", oldest)
	}
	c.ack(r)
	updated := c.recv(resource.ClusterType)[resource.ClusterType].updated
	if want, _ := diffVersions(second.Cache.GetVersionMap(resource.ClusterType), last.Cache.GetVersionMap(resource.ClusterType)); len(want) == 0 || !slices.Equal(updated, want) {
		t.Fatalf("clusters: sent %v, want %v", updated, want)
	}
	if !maps.Equal(c.held[resource.ClusterType], last.Cache.GetVersionMap(resource.ClusterType)) {
		t.Fatal("clusters held differ from the snapshot's")
	}
}

// TestDeltaExplicitSubscriptions checks a stream that names its endpoints, subscribing and
// unsubscribing as it goes (as the built-in data plane and Envoy's EDS do): a name subscribed
// later is sent alone, and a change to a name unsubscribed is not sent.
func TestDeltaExplicitSubscriptions(t *testing.T) {
	s := startServer(t)
	cat := largeCatalog(5)
	build := serveCatalog(t, s, cat)
	first := build()
	names := slices.Sorted(maps.Keys(first.Cache.GetVersionMap(resource.EndpointType)))
	of := func(host string) string {
		for _, n := range names {
			if strings.HasSuffix(n, "|"+host) {
				return n
			}
		}
		t.Fatalf("no endpoints for %s in %v", host, names)
		return ""
	}
	a, b := of(cat.Services[1].Host), of(cat.Services[2].Host)
	c := dialDelta(t, s.addr)
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{a}})
	if got := c.recv(resource.EndpointType)[resource.EndpointType].updated; !slices.Equal(got, []string{a}) {
		t.Fatalf("first response: %v, want %v", got, []string{a})
	}
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{b}})
	if got := c.recv(resource.EndpointType)[resource.EndpointType].updated; !slices.Equal(got, []string{b}) {
		t.Fatalf("after subscribing %s: %v", b, got)
	}
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesUnsubscribe: []string{b}})
	waitFor(t, "the unsubscription reaching the cache", func() bool {
		s.delta.mu.Lock()
		defer s.delta.mu.Unlock()
		for _, w := range s.delta.watches {
			if slices.Contains(w.req.GetResourceNamesUnsubscribe(), b) {
				return true
			}
		}
		return false
	})
	// Service 2 (b, unsubscribed) changes, then service 1 (a): the next response is a's alone.
	cat.Services[2].Identities = []string{"spiffe://cluster.local/ns/x/sa/b"}
	build()
	cat.Services[1].Identities = []string{"spiffe://cluster.local/ns/x/sa/a"}
	build()
	if d := c.recv(resource.EndpointType)[resource.EndpointType]; !slices.Equal(d.updated, []string{a}) || len(d.removed) != 0 {
		t.Fatalf("after changes to %s and %s: sent %v, removed %v; want sent [%s]", b, a, d.updated, d.removed, a)
	}
}

// serveCatalog returns a function that translates cat as it is now, builds its snapshot
// incrementally (one Translator and Builder, as the daemon does) and sets it on s.
func serveCatalog(t *testing.T, s *testServer, cat *catalog.Catalog) func() *Snapshot {
	var translator Translator
	var builder Builder
	return func() *Snapshot {
		t.Helper()
		res, err := translator.Translate(cat, benchOptions())
		if err != nil {
			t.Fatal(err)
		}
		snap, err := builder.Build(res, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Set(context.Background(), snap); err != nil {
			t.Fatal(err)
		}
		return snap
	}
}

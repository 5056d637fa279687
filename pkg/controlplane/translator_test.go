package controlplane

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// TestTranslatorMatchesTranslate: a Translator and a Builder kept across changes give exactly
// what a fresh Translate and NewSnapshot give, reuse the objects of unchanged services, and still
// refuse an invalid resource in a rebuild.
func TestTranslatorMatchesTranslate(t *testing.T) {
	cat := largeCatalog(50)
	opts := benchOptions()
	var tr Translator
	var b Builder
	first, err := tr.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Build(first, nil); err != nil {
		t.Fatal(err)
	}
	changes := []func(){
		func() { cat.Services[3].Identities = []string{"spiffe://cluster.local/ns/x/sa/changed"} },
		func() {
			cat.Services[7].Ports = slices.Clone(cat.Services[7].Ports)
			cat.Services[7].Ports[1].Number = 40000
		},
		func() { cat.Services = append(cat.Services[:10], cat.Services[11:]...) },
		func() { cat.Services = append(cat.Services, largeCatalog(60).Services[55]) }, // added last
		func() { cat.Services = append([]catalog.Service{largeCatalog(60).Services[0]}, cat.Services[1:]...) },
		func() { cat.Services[20].Subsets = []catalog.Subset{{Name: "v2", Hosts: []string{"v2.example"}}} },
		func() { cat.Services[21].AllowedClients = []string{"10.1.0.0/16"} },
		func() {},                           // nothing
		func() { opts.ConnectTimeout *= 2 }, // every service
		func() { cat.Services[5].Identities = []string{"spiffe://cluster.local/ns/x/sa/changed-again"} },
	}
	for i, change := range changes {
		change()
		got, err := tr.Translate(cat, opts)
		if err != nil {
			t.Fatal(err)
		}
		want, err := Translate(cat, opts)
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Clusters) != len(want.Clusters) || len(got.Listeners) != len(want.Listeners) {
			t.Fatalf("change %d: %d clusters, %d listeners; fresh translation %d, %d", i, len(got.Clusters), len(got.Listeners), len(want.Clusters), len(want.Listeners))
		}
		for j := range want.Clusters {
			if !proto.Equal(got.Clusters[j], want.Clusters[j]) || !proto.Equal(got.Endpoints[j], want.Endpoints[j]) {
				t.Fatalf("change %d: cluster %s differs from a fresh translation", i, want.Clusters[j].Name)
			}
		}
		for j := range want.Listeners {
			if !proto.Equal(got.Listeners[j], want.Listeners[j]) {
				t.Fatalf("change %d: listener %s differs from a fresh translation", i, want.Listeners[j].Name)
			}
		}
		snap, err := b.Build(got, nil)
		if err != nil {
			t.Fatal(err)
		}
		fresh, err := NewSnapshot(want, nil)
		if err != nil {
			t.Fatal(err)
		}
		if snap.ConfigVersion != fresh.ConfigVersion {
			t.Fatalf("change %d: incremental build version %s, fresh %s", i, snap.ConfigVersion, fresh.ConfigVersion)
		}
		if len(fresh.Cache.GetVersionMap(resource.ClusterType)) == 0 {
			t.Fatalf("change %d: a fresh build has no delta versions to compare", i)
		}
		for _, typ := range deltaTypes {
			if m := fresh.Cache.GetVersionMap(typ); fmt.Sprint(m) != fmt.Sprint(snap.Cache.GetVersionMap(typ)) {
				t.Fatalf("change %d: %s delta versions differ from a fresh build", i, typ)
			}
			if a, b := slices.Sorted(maps.Keys(snap.Cache.GetResources(typ))), slices.Sorted(maps.Keys(fresh.Cache.GetResources(typ))); !slices.Equal(a, b) {
				t.Fatalf("change %d: %s resources %v, fresh build %v", i, typ, a, b)
			}
			if snap.Cache.GetVersion(typ) != fresh.Cache.GetVersion(typ) {
				t.Fatalf("change %d: %s version differs from a fresh build", i, typ)
			}
		}
	}
	// An unchanged service's resources are the same objects.
	again, _ := tr.Translate(cat, opts)
	prev, _ := tr.Translate(cat, opts)
	if again.Clusters[0] != prev.Clusters[0] || again.Listeners[0] != prev.Listeners[0] {
		t.Fatal("unchanged service translated anew")
	}
	// The same services in lists of their own (a source's new catalog, not a merge that shares
	// them) are compared by content: still the same objects.
	copied := &catalog.Catalog{Services: make([]catalog.Service, len(cat.Services))}
	for i := range cat.Services {
		copied.Services[i] = cat.Services[i].Clone()
	}
	if fromCopy, _ := tr.Translate(copied, opts); !slices.Equal(fromCopy.Clusters, prev.Clusters) || !slices.Equal(fromCopy.Listeners, prev.Listeners) {
		t.Fatal("the same services in new lists translated anew")
	}
	prev, _ = tr.Translate(cat, opts)
	// A change to a service's identity gives new clusters; its endpoints, listener and virtual
	// host (in the shared route configuration) stay the same objects.
	cat.Services[9].Identities = []string{"spiffe://cluster.local/ns/x/sa/nine"}
	changed, err := tr.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range changed.Clusters {
		if c := changed.Clusters[i]; (c != prev.Clusters[i]) != strings.HasSuffix(c.Name, cat.Services[9].Host) {
			t.Fatalf("cluster %s: new object %v", c.Name, c != prev.Clusters[i])
		}
	}
	if !slices.Equal(changed.Endpoints, prev.Endpoints) || !slices.Equal(changed.Listeners, prev.Listeners) || !slices.Equal(changed.Routes, prev.Routes) {
		t.Fatal("an identity change made new endpoints, listeners or route configurations")
	}
	// A rebuild still validates what changed, inside the shared route configuration too.
	cat.Services[0].Ports = slices.Clone(cat.Services[0].Ports)
	cat.Services[0].Ports[0].Number = 9090 // the route configuration of a port of its own
	res, err := tr.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	broken := 0
	for i, rc := range res.Routes {
		if rc.Name == "9090" {
			broken++
			bad := proto.Clone(rc).(*route.RouteConfiguration) // new objects, as a change makes
			bad.VirtualHosts[0].Domains = nil                  // a virtual host needs a domain
			res.Routes = slices.Clone(res.Routes)
			res.Routes[i] = bad
		}
	}
	if broken != 1 {
		t.Fatalf("%d route configurations named 9090 to break", broken)
	}
	if _, err := b.Build(res, nil); err == nil || !strings.Contains(err.Error(), "9090") {
		t.Fatalf("invalid virtual host accepted or error unclear: %v", err)
	}
	// A rebuild still checks the references of what changed: endpoints without their cluster,
	// a cluster without its endpoints.
	res, _ = tr.Translate(cat, opts)
	if _, err := b.Build(res, nil); err != nil {
		t.Fatal(err)
	}
	noCluster := *res
	noCluster.Clusters = slices.Delete(slices.Clone(res.Clusters), 3, 4)
	if _, err := b.Build(&noCluster, nil); err == nil || !strings.Contains(err.Error(), "nothing references it") {
		t.Fatalf("endpoints of a removed cluster accepted: %v", err)
	}
	noEndpoints := *res
	noEndpoints.Endpoints = slices.Delete(slices.Clone(res.Endpoints), 3, 4)
	if _, err := b.Build(&noEndpoints, nil); err == nil || !strings.Contains(err.Error(), "referenced but not in the snapshot") {
		t.Fatalf("a cluster without its endpoints accepted: %v", err)
	}
	if _, err := b.Build(res, nil); err != nil { // the refused builds left the builder as it was
		t.Fatal(err)
	}
}

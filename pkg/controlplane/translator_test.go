package controlplane

import (
	"fmt"
	"strings"
	"testing"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/proto"
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
		func() { cat.Services[3].Identities[0] = "spiffe://cluster.local/ns/x/sa/changed" },
		func() { cat.Services[7].Ports[1].Number = 40000 },
		func() { cat.Services = append(cat.Services[:10], cat.Services[11:]...) },
		func() { opts.ConnectTimeout *= 2 }, // every service
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
		if len(fresh.Cache.VersionMap) == 0 {
			t.Fatalf("change %d: a fresh build has no delta versions to compare", i)
		}
		for typ, m := range fresh.Cache.VersionMap {
			if fmt.Sprint(m) != fmt.Sprint(snap.Cache.VersionMap[typ]) {
				t.Fatalf("change %d: %s delta versions differ from a fresh build", i, typ)
			}
		}
	}
	// An unchanged service's resources are the same objects.
	again, _ := tr.Translate(cat, opts)
	prev, _ := tr.Translate(cat, opts)
	if again.Clusters[0] != prev.Clusters[0] || again.Listeners[0] != prev.Listeners[0] {
		t.Fatal("unchanged service translated anew")
	}
	// A rebuild still validates what changed, inside the shared route configuration too.
	cat.Services[0].Ports[0].Number = 9090 // the route configuration of a port of its own
	res, err := tr.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	broken := 0
	for _, rc := range res.Routes {
		if rc.Name == "9090" {
			broken++
			bad := proto.Clone(rc.VirtualHosts[0]).(*route.VirtualHost) // a new object, as a change makes
			bad.Domains = nil                                           // a virtual host needs a domain
			rc.VirtualHosts[0] = bad
		}
	}
	if broken != 1 {
		t.Fatalf("%d route configurations named 9090 to break", broken)
	}
	if _, err := b.Build(res, nil); err == nil || !strings.Contains(err.Error(), "9090") {
		t.Fatalf("invalid virtual host accepted or error unclear: %v", err)
	}
}

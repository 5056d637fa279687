package controlplane

import (
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// Resources given in any order are served the same as sorted ones, and looked up by name; a
// name given twice is refused with the type and the name.
func TestServedSortsResourcesAndRefusesANameTwice(t *testing.T) {
	res, err := Translate(largeCatalog(20), benchOptions())
	if err != nil {
		t.Fatal(err)
	}
	sorted, err := NewSnapshot(res, nil)
	if err != nil {
		t.Fatal(err)
	}
	shuffled := *res
	shuffled.Clusters = slices.Clone(res.Clusters)
	slices.Reverse(shuffled.Clusters)
	got, err := NewSnapshot(&shuffled, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.ConfigVersion != sorted.ConfigVersion {
		t.Fatalf("clusters in reverse order: version %s, sorted %s", got.ConfigVersion, sorted.ConfigVersion)
	}
	versions := got.Cache.GetVersionMap(resource.ClusterType)
	if !maps.Equal(versions, sorted.Cache.GetVersionMap(resource.ClusterType)) || len(versions) != len(res.Clusters) {
		t.Fatalf("clusters in reverse order: delta versions differ from the sorted build's")
	}
	served := got.Cache.typ(resource.ClusterType)
	for _, c := range res.Clusters {
		r, v, ok := served.lookup(c.GetName())
		if !ok || r != c || v.String() != versions[c.GetName()] {
			t.Fatalf("lookup(%s) = %v, %s, %v; want the cluster at version %s", c.GetName(), r != nil, v, ok, versions[c.GetName()])
		}
	}
	if _, _, ok := served.lookup("outbound|1||nowhere"); ok {
		t.Fatal("lookup found a cluster that is not served")
	}
	if !slices.IsSortedFunc(served.items, func(a, b types.Resource) int {
		return strings.Compare(cache.GetResourceName(a), cache.GetResourceName(b))
	}) {
		t.Fatal("served clusters are not sorted by name")
	}

	twice := *res
	twice.Clusters = append(slices.Clone(res.Clusters), &clusterv3.Cluster{Name: res.Clusters[3].GetName()})
	if _, err := NewSnapshot(&twice, nil); err == nil || !strings.Contains(err.Error(), "two clusters are named") || !strings.Contains(err.Error(), res.Clusters[3].GetName()) {
		t.Fatalf("a cluster name given twice: %v; want it refused by name", err)
	}
}

// A rebuild shares each unchanged type with the last build (the delta cache skips it by
// identity), and the served maps agree with what is looked up.
func TestServedSharesUnchangedTypes(t *testing.T) {
	_, _, _, bundle := identityFiles(t, t.TempDir())
	cat := largeCatalog(30)
	opts := benchOptions()
	var tr Translator
	var b Builder
	res, _ := tr.Translate(cat, opts)
	first, err := b.Build(res, bundle)
	if err != nil {
		t.Fatal(err)
	}
	cat.Services[4].Identities = []string{"spiffe://cluster.local/ns/x/sa/four"} // its clusters change
	res, _ = tr.Translate(cat, opts)
	second, err := b.Build(res, bundle)
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{resource.ListenerType, resource.RouteType} {
		if first.Cache.typ(typ) != second.Cache.typ(typ) {
			t.Errorf("%s: unchanged, but not shared with the last build", typ)
		}
	}
	for _, typ := range []string{resource.ClusterType, resource.EndpointType} {
		if first.Cache.typ(typ) == second.Cache.typ(typ) {
			t.Errorf("%s: changed, but shared with the last build", typ)
		}
		if first.Cache.GetVersion(typ) == second.Cache.GetVersion(typ) {
			t.Errorf("%s: changed, but its version did not", typ)
		}
	}
	if got := changedNames(first.Cache.typ(resource.ClusterType), second.Cache.typ(resource.ClusterType)); len(got) != 2 || !strings.HasSuffix(got[0], cat.Services[4].Host) {
		t.Errorf("changed clusters %v, want the two of %s", got, cat.Services[4].Host)
	}
	secrets := second.Cache.GetResources(resource.SecretType)
	if len(secrets) != 2 || secrets[SecretCertificate] == nil || secrets[SecretRoots] == nil {
		t.Fatalf("secrets served %v, want %s and %s", slices.Sorted(maps.Keys(secrets)), SecretCertificate, SecretRoots)
	}
	for name, v := range second.Cache.GetVersionMap(resource.SecretType) {
		if v != second.SecretsVersion {
			t.Errorf("secret %s at version %s, want the secrets' version %s", name, v, second.SecretsVersion)
		}
	}
	if (&Served{}).GetVersion(resource.ClusterType) != "" || (&Served{}).GetResources(resource.ClusterType) != nil {
		t.Error("an empty snapshot serves something")
	}
}

// A Builder that built before takes resources in any order, or with a name twice, as a first
// build does: the same versions as a fresh build of them sorted, or the same refusal. Its
// comparison with the last build is what finds them out of order.
func TestServedRebuildOfShuffledResources(t *testing.T) {
	res, err := Translate(largeCatalog(40), benchOptions())
	if err != nil {
		t.Fatal(err)
	}
	want, err := NewSnapshot(res, nil)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 50 {
		var b Builder
		if _, err := b.Build(res, nil); err != nil {
			t.Fatal(err)
		}
		shuffled := *res
		shuffled.Clusters = slices.Clone(res.Clusters)
		shuffled.Endpoints = slices.Clone(res.Endpoints)
		// A few swaps, near or far, so that most of the list stays in its last order.
		for range 1 + rng.IntN(3) {
			i, j := rng.IntN(len(shuffled.Clusters)), rng.IntN(len(shuffled.Clusters))
			shuffled.Clusters[i], shuffled.Clusters[j] = shuffled.Clusters[j], shuffled.Clusters[i]
		}
		twice := round%5 == 0
		if twice {
			k := rng.IntN(len(shuffled.Endpoints) - 1)
			shuffled.Endpoints[k+1] = shuffled.Endpoints[k]
		}
		got, err := b.Build(&shuffled, nil)
		if twice {
			if err == nil || !strings.Contains(err.Error(), "two endpoints are named") {
				t.Fatalf("round %d: an endpoint given twice: %v; want it refused", round, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if got.ConfigVersion != want.ConfigVersion {
			t.Fatalf("round %d: version %s after a shuffle, %s sorted", round, got.ConfigVersion, want.ConfigVersion)
		}
		served := got.Cache.typ(resource.ClusterType)
		for _, c := range res.Clusters {
			if r, _, ok := served.lookup(c.GetName()); !ok || r != c {
				t.Fatalf("round %d: cluster %s not found after a shuffle", round, c.GetName())
			}
		}
	}
}

// A first build checks every reference: an endpoint no cluster takes, or a cluster whose
// endpoints are missing, is refused by name.
func TestFirstBuildChecksEveryReference(t *testing.T) {
	res, err := Translate(largeCatalog(30), benchOptions())
	if err != nil {
		t.Fatal(err)
	}
	noCluster := *res
	noCluster.Clusters = slices.Delete(slices.Clone(res.Clusters), 7, 8)
	if _, err := NewSnapshot(&noCluster, nil); err == nil || !strings.Contains(err.Error(), "nothing references it") || !strings.Contains(err.Error(), res.Clusters[7].GetName()) {
		t.Fatalf("endpoints without their cluster: %v; want them refused by name", err)
	}
	noEndpoints := *res
	noEndpoints.Endpoints = slices.Delete(slices.Clone(res.Endpoints), 11, 12)
	if _, err := NewSnapshot(&noEndpoints, nil); err == nil || !strings.Contains(err.Error(), "referenced but not in the snapshot") || !strings.Contains(err.Error(), res.Endpoints[11].GetClusterName()) {
		t.Fatalf("a cluster without its endpoints: %v; want it refused by name", err)
	}
}

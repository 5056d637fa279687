package discovery

import (
	"slices"
	"strings"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// The same host in two clusters, each with its own east-west gateway, is one service: both
// gateways, identities united, ports united.
func TestMergeMultiCluster(t *testing.T) {
	east := &catalog.Catalog{Services: []catalog.Service{{Host: "reviews.bookinfo.svc.cluster.local",
		Ports:      []catalog.Port{{Number: 9080, Protocol: catalog.HTTP, Name: "http"}},
		Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/reviews"}, Gateways: []string{"east"}}}}
	west := &catalog.Catalog{Services: []catalog.Service{{Host: "reviews.bookinfo.svc.cluster.local",
		Ports:      []catalog.Port{{Number: 9080, Protocol: catalog.HTTP, Name: "http"}, {Number: 9443, Protocol: catalog.TCP, Name: "tls"}},
		Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/reviews", "spiffe://cluster.local/ns/bookinfo/sa/reviews-v3"},
		Gateways:   []string{"west"}}}}
	opts := catalog.Options{Gateways: []string{"east", "west"}}
	got, conflicts := Merge(opts, east, west)
	if len(conflicts) != 0 {
		t.Fatalf("conflicts: %v", conflicts)
	}
	s := got.Lookup("reviews.bookinfo.svc.cluster.local")
	if s == nil || !slices.Equal(s.Gateways, []string{"east", "west"}) ||
		!slices.Equal(s.Identities, []string{"spiffe://cluster.local/ns/bookinfo/sa/reviews", "spiffe://cluster.local/ns/bookinfo/sa/reviews-v3"}) ||
		len(s.Ports) != 2 {
		t.Fatalf("merged: %+v", s)
	}
	if len(east.Services[0].Gateways) != 1 || len(east.Services[0].Identities) != 1 {
		t.Errorf("the source's catalog was changed: %+v", east.Services[0])
	}

	// A port the clusters disagree on keeps the first cluster's protocol, reported.
	west.Services[0].Ports[0].Protocol = catalog.TCP
	got, conflicts = Merge(opts, east, west)
	if len(conflicts) != 1 || !strings.Contains(conflicts[0].Error(), "port 9080 is http in one cluster and tcp in another") {
		t.Errorf("conflicts: %v", conflicts)
	}
	if p := got.Lookup("reviews.bookinfo.svc.cluster.local").Ports[0]; p.Protocol != catalog.HTTP {
		t.Errorf("port kept: %+v", p)
	}

	// A file entry (no gateways named) still shadows, as do two entries on one gateway.
	file := &catalog.Catalog{Services: []catalog.Service{{Host: "reviews.bookinfo.svc.cluster.local",
		Ports: []catalog.Port{{Number: 9080, Protocol: catalog.HTTP}}, Identities: []string{"spiffe://cluster.local/ns/x/sa/y"}}}}
	for name, cats := range map[string][]*catalog.Catalog{"file first": {file, east}, "same gateway": {east, east}} {
		got, conflicts := Merge(opts, cats...)
		if len(conflicts) != 1 || !strings.Contains(conflicts[0].Error(), "the first one wins") {
			t.Errorf("%s: conflicts %v", name, conflicts)
		}
		if s := got.Lookup("reviews.bookinfo.svc.cluster.local"); !slices.Equal(s.Identities, cats[0].Services[0].Identities) {
			t.Errorf("%s: %+v", name, s)
		}
	}
}

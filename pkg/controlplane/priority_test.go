package controlplane

import (
	"net/netip"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// One service through the local cluster's gateway and a remote one: two EDS priority levels,
// numbered without gaps whatever the gateways' priorities are; without priorities one group.
func TestGatewayPriorities(t *testing.T) {
	cat := &catalog.Catalog{Services: []catalog.Service{{Host: "reviews.bookinfo.svc.cluster.local",
		Ports:      []catalog.Port{{Number: 9080, Protocol: catalog.HTTP}},
		Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/reviews"}, Gateways: []string{"east", "west"}}}}
	_, opts := loadGolden(t, "testdata/in/minimal-tcp.yaml")
	opts.Gateways = []Gateway{
		{Name: "east", Addresses: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:15443"), netip.MustParseAddrPort("192.0.2.2:15443")}},
		{Name: "west", Priority: 5, Addresses: []netip.AddrPort{netip.MustParseAddrPort("198.51.100.1:15443")}},
	}
	res, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Endpoints) != 1 {
		t.Fatalf("endpoints: %v", res.Endpoints)
	}
	le := res.Endpoints[0].Endpoints
	if len(le) != 2 || le[0].Priority != 0 || le[1].Priority != 1 || len(le[0].LbEndpoints) != 2 || len(le[1].LbEndpoints) != 1 ||
		le[1].LbEndpoints[0].GetEndpoint().GetHostname() != "west" {
		t.Fatalf("localities: %v", le)
	}
	for _, cla := range res.Endpoints {
		if err := cla.ValidateAll(); err != nil {
			t.Error(err)
		}
	}
	opts.Gateways[1].Priority = 0
	res, err = Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	if le := res.Endpoints[0].Endpoints; len(le) != 1 || len(le[0].LbEndpoints) != 3 {
		t.Errorf("one priority: %v", le)
	}
}

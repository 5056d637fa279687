package discovery

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// A Merger returns exactly what Merge returns, over random changes to three sources: shadowed
// and multi-cluster hosts, invalid services, host, alias and TCP port collisions, a host listed
// twice, a source not yet reported, other options.
func TestMergerMatchesMerge(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	host := func() string { return fmt.Sprintf("h%d.ns.svc.cluster.local", r.IntN(14)) }
	service := func() catalog.Service {
		s := catalog.Service{Host: host(), Identities: []string{fmt.Sprintf("spiffe://cluster.local/ns/ns/sa/i%d", r.IntN(3))}}
		s.Ports = []catalog.Port{{Number: 8080, Protocol: catalog.HTTP}}
		switch r.IntN(6) {
		case 0:
			s.Ports = append(s.Ports, catalog.Port{Number: uint32(9000 + r.IntN(8)), Protocol: catalog.TCP})
		case 1:
			s.Ports = []catalog.Port{{Number: uint32(9000 + r.IntN(8)), Protocol: catalog.TCP}}
		case 2:
			s.Aliases = []string{fmt.Sprintf("a%d.example.com", r.IntN(6))}
		case 3:
			s.Gateways = []string{[]string{"east", "west", "north"}[r.IntN(3)]}
		}
		if r.IntN(25) == 0 {
			s.Identities = nil // invalid: left out
		}
		if r.IntN(30) == 0 {
			s.Ports[0].Number = 15000 // reserved in some options below
		}
		return s
	}
	cats := make([]*catalog.Catalog, 3)
	for i := range cats {
		cats[i] = &catalog.Catalog{}
		for range 4 + r.IntN(5) {
			cats[i].Services = append(cats[i].Services, service())
		}
	}
	optsA := catalog.Options{Gateways: []string{"east", "west", "north"}}
	optsB := catalog.Options{Gateways: []string{"east", "west", "north"}, Reserved: []catalog.ReservedPort{{Port: 15000, Field: "metrics.address", Address: "127.0.0.1:15000"}}}
	opts := optsA
	var m Merger
	for step := range 3000 {
		i := r.IntN(len(cats))
		next := &catalog.Catalog{}
		if cats[i] != nil {
			next.Services = slices.Clone(cats[i].Services)
		}
		switch k := r.IntN(20); {
		case k < 6 && len(next.Services) > 0:
			next.Services[r.IntN(len(next.Services))] = service()
		case k < 10:
			next.Services = slices.Insert(next.Services, r.IntN(len(next.Services)+1), service())
		case k < 14 && len(next.Services) > 0:
			j := r.IntN(len(next.Services))
			next.Services = slices.Delete(next.Services, j, j+1)
		case k == 14 && len(next.Services) > 0:
			next.Services = append(next.Services, next.Services[r.IntN(len(next.Services))]) // listed twice
		case k == 15:
			next = nil // not reported yet
		case k == 16:
			if reflect.DeepEqual(opts, optsA) {
				opts = optsB
			} else {
				opts = optsA
			}
			next = cats[i]
		case k == 17:
			next = cats[i] // nothing changed
		}
		cats[i] = next
		want, wantConflicts := Merge(opts, cats...)
		got, gotConflicts := m.Merge(opts, cats...)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("step %d: Merger (checked %v)\n%+v\nMerge (checked %v)\n%+v", step, got.Checked, got.Services, want.Checked, want.Services)
		}
		if want.Checked != (len(want.Problems(opts)) == 0) || want.Checked && len(want.Problems(catalog.Options{})) > 0 {
			t.Fatalf("step %d: Merge's result checked %v, with problems %v", step, want.Checked, want.Problems(opts))
		}
		if fmt.Sprint(gotConflicts) != fmt.Sprint(wantConflicts) {
			t.Fatalf("step %d: Merger's conflicts\n%v\nMerge's\n%v", step, gotConflicts, wantConflicts)
		}
	}
	if m.scratch > 2000 {
		t.Errorf("%d of 3000 merges from scratch: the patch is hardly ever taken", m.scratch)
	}
	t.Logf("%d of 3000 merges from scratch", m.scratch)
}

// One operator entry overriding one of 10,000 discovered services is patched in: the whole
// catalog is not merged and checked again (and the override's conflict is still reported).
func TestMergerPatchesOneChangeIn(t *testing.T) {
	disc := &catalog.Catalog{}
	for i := range 10000 {
		disc.Services = append(disc.Services, catalog.Service{Host: fmt.Sprintf("svc-%05d.ns.svc.cluster.local", i),
			Ports:      []catalog.Port{{Number: 8080, Protocol: catalog.HTTP}, {Number: uint32(20000 + i), Protocol: catalog.TCP}},
			Identities: []string{fmt.Sprintf("spiffe://cluster.local/ns/ns/sa/svc-%05d", i)}})
	}
	var m Merger
	opts := catalog.Options{}
	m.Merge(opts, nil, disc)
	for k := range 5 {
		over := disc.Services[k*977].Clone()
		over.Identities = []string{fmt.Sprintf("spiffe://cluster.local/ns/bench/sa/change-%d", k)}
		op := &catalog.Catalog{Services: []catalog.Service{over}}
		got, conflicts := m.Merge(opts, op, disc)
		want, wantConflicts := Merge(opts, op, disc)
		if !reflect.DeepEqual(got, want) || fmt.Sprint(conflicts) != fmt.Sprint(wantConflicts) || len(conflicts) != 1 {
			t.Fatalf("change %d: the patched merge differs from Merge (conflicts %v, want %v)", k, conflicts, wantConflicts)
		}
		if s := got.Lookup(over.Host); s == nil || s.Identities[0] != over.Identities[0] {
			t.Fatalf("change %d: the operator entry does not win: %+v", k, s)
		}
	}
	if m.scratch != 1 {
		t.Errorf("%d merges from scratch for a first merge and 5 one-entry changes, want 1", m.scratch)
	}
}

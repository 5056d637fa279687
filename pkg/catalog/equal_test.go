package catalog

import (
	"math/rand/v2"
	"reflect"
	"testing"
)

// Equal must give reflect.DeepEqual's answer for every pair, so that translation never takes a
// changed service for an unchanged one. Each field is drawn from a few values (nil and empty
// slices among them), and each pair differs in at most one field.
func TestServiceEqualIsDeepEqual(t *testing.T) {
	const fields = 8
	if n := reflect.TypeOf(Service{}).NumField(); n != fields {
		t.Fatalf("Service has %d fields: compare the new one in Service.Equal, then update this count", n)
	}
	r := rand.New(rand.NewPCG(3, 4))
	strs := func() []string {
		return [][]string{nil, {}, {"a"}, {"a", "b"}, {"b"}}[r.IntN(5)]
	}
	service := func() Service {
		s := Service{
			Host:           []string{"a.svc", "b.svc"}[r.IntN(2)],
			Aliases:        strs(),
			Identities:     strs(),
			AllowedClients: strs(),
			Gateways:       strs(),
		}
		s.Ports = [][]Port{nil, {}, {{Number: 80, Protocol: HTTP}}, {{Number: 80, Protocol: TCP}}, {{Number: 80, Protocol: HTTP, Name: "web"}}}[r.IntN(5)]
		s.Subsets = [][]Subset{nil, {}, {{Name: "v1"}}, {{Name: "v1", Hosts: []string{}}}, {{Name: "v1", Hosts: []string{"v1.a.svc"}}}, {{Name: "v2", Hosts: []string{"v1.a.svc"}}}}[r.IntN(6)]
		switch r.IntN(4) {
		case 1:
			s.Transcoding = &Transcoding{Services: []string{"shop.v1.Catalog"}}
		case 2:
			s.Transcoding = &Transcoding{Services: []string{"shop.v1.Catalog"}, Descriptor: []byte{1}}
		case 3:
			s.Transcoding = &Transcoding{Services: []string{"shop.v1.Catalog"}, Print: PrintOptions{EmitDefaults: true}}
		}
		return s
	}
	equal, differ := 0, 0
	for range 20000 {
		// b is a's copy with at most one field drawn again, which may or may not change it.
		a := service()
		b, c := a.Clone(), service()
		if k := r.IntN(fields + 1); k < fields { // fields: none drawn again
			reflect.ValueOf(&b).Elem().Field(k).Set(reflect.ValueOf(c).Field(k))
		}
		want := reflect.DeepEqual(a, b)
		if got := a.Equal(&b); got != want {
			t.Fatalf("Equal(%+v, %+v) = %v, DeepEqual %v", a, b, got, want)
		}
		if want {
			equal++
		} else {
			differ++
		}
	}
	if equal < 1000 || differ < 1000 {
		t.Fatalf("%d equal and %d differing pairs: the draw does not exercise both", equal, differ)
	}
}

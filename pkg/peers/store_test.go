package peers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

func TestClockIsMonotonicAndMovesPastObserved(t *testing.T) {
	wall := time.UnixMilli(1000)
	c := &Clock{now: func() time.Time { return wall }}
	a := c.Now()
	b := c.Now()
	if b.Compare(a) <= 0 || b.Wall != 1000 || b.Logical != 1 {
		t.Fatalf("second reading %+v not after %+v", b, a)
	}
	wall = time.UnixMilli(900) // the wall clock steps back
	if d := c.Now(); d.Compare(b) <= 0 {
		t.Fatalf("reading %+v went backwards from %+v", d, b)
	}
	c.Observe(Timestamp{Wall: 5000, Logical: 7}) // a peer ahead of us
	if e := c.Now(); e.Compare(Timestamp{Wall: 5000, Logical: 7}) <= 0 {
		t.Fatalf("reading %+v not after the observed timestamp", e)
	}
}

func TestEntryOrderIsTotal(t *testing.T) {
	base := Entry{Key: "k", Time: Timestamp{Wall: 10}, Node: "b", Value: json.RawMessage(`{}`)}
	later := base
	later.Time.Logical = 1
	otherNode := base
	otherNode.Node = "c"
	del := base
	del.Deleted, del.Value = true, nil
	for _, c := range []struct {
		name string
		a, b Entry
	}{{"later timestamp", later, base}, {"greater node", otherNode, base}, {"delete over value on a full tie", del, base}} {
		if !c.a.Newer(&c.b) || c.b.Newer(&c.a) {
			t.Errorf("%s: order not strict", c.name)
		}
	}
}

func serviceJSON(t testing.TB, host string, port uint32) []byte {
	t.Helper()
	b, err := json.Marshal(svc(host, port))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Merging the same writes in any order, any number of times, gives the same contents.
func TestMergeIsOrderIndependent(t *testing.T) {
	val := CatalogValidator(catalog.Options{})
	var writes []Entry
	for i, node := range []string{"a", "b", "c"} {
		s := NewStore(node, val, StoreOptions{})
		for j := range 20 {
			host := fmt.Sprintf("s%d.default.svc.cluster.local", j%7)
			if j%5 == 4 {
				if e, ok := s.Delete(OperatorKey(host)); ok {
					writes = append(writes, e)
				}
				continue
			}
			e, changed, err := s.Put(OperatorKey(host), serviceJSON(t, host, uint32(1000+i*100+j)))
			if err != nil {
				t.Fatal(err)
			}
			if changed {
				writes = append(writes, e)
			}
		}
	}
	var want string
	for round := range 20 {
		s := NewStore("observer", val, StoreOptions{})
		order := rand.Perm(len(writes))
		for _, i := range order {
			s.Merge([]Entry{writes[i]})
			if round%2 == 0 { // duplicates change nothing
				s.Merge([]Entry{writes[i]})
			}
		}
		d, _ := s.Digest()
		if round == 0 {
			want = d
		} else if d != want {
			t.Fatalf("round %d: digest %s, want %s", round, d, want)
		}
	}
}

func TestDigestIgnoresHowContentsArrived(t *testing.T) {
	val := CatalogValidator(catalog.Options{})
	a := NewStore("a", val, StoreOptions{})
	b := NewStore("b", val, StoreOptions{})
	h := "reviews.default.svc.cluster.local"
	if _, _, err := a.Put(OperatorKey(h), serviceJSON(t, h, 9080)); err != nil {
		t.Fatal(err)
	}
	// b writes the same service with fields in another order and a trailing dot: canonicalized.
	raw := []byte(`{"identities":["spiffe://cluster.local/ns/default/sa/reviews"],"ports":[{"protocol":"HTTP","number":9080}],"host":"reviews.default.svc.cluster.local"}`)
	if _, _, err := b.Put(OperatorKey(h), raw); err != nil {
		t.Fatal(err)
	}
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Fatalf("equal contents, different digests: %s %s", da, db)
	}
	b.Delete(OperatorKey(h))
	if db2, n := b.Digest(); db2 == da || n != 0 {
		t.Fatal("delete did not change the digest")
	}
}

func TestStoreRejectsBadEntries(t *testing.T) {
	now := time.Now()
	s := NewStore("a", CatalogValidator(catalog.Options{Gateways: []string{"eastwest"}}), StoreOptions{Now: func() time.Time { return now }})
	h := "reviews.default.svc.cluster.local"
	good := serviceJSON(t, h, 9080)
	noGateway := svc(h, 9080)
	noGateway.Gateways = []string{"missing"}
	ng, _ := json.Marshal(noGateway)
	ts := Timestamp{Wall: now.UnixMilli()}
	cases := []struct {
		name string
		e    Entry
	}{
		{"unknown gateway", Entry{Key: OperatorKey(h), Value: ng, Time: ts, Node: "b"}},
		{"not a service", Entry{Key: OperatorKey(h), Value: json.RawMessage(`{"host":1}`), Time: ts, Node: "b"}},
		{"unknown field", Entry{Key: OperatorKey(h), Value: json.RawMessage(`{"host":"` + h + `","evil":true}`), Time: ts, Node: "b"}},
		{"ready marker with a value", Entry{Key: readyKey("file:x"), Value: json.RawMessage(`{"a":1}`), Time: ts, Node: "b"}},
		{"no writer", Entry{Key: OperatorKey(h), Value: good, Time: ts}},
		{"far future", Entry{Key: OperatorKey(h), Value: good, Time: Timestamp{Wall: now.Add(time.Hour).UnixMilli()}, Node: "b"}},
	}
	for _, c := range cases {
		changed, rejected := s.Merge([]Entry{c.e})
		if len(changed) != 0 || len(rejected) != 1 {
			t.Errorf("%s: changed %d rejected %v", c.name, len(changed), rejected)
		}
	}
	if _, rej := s.Merge([]Entry{cases[5].e}); !errors.Is(rej[0], ErrClockSkew) {
		t.Errorf("far future: %v, want ErrClockSkew", rej[0])
	}
	if _, n := s.Digest(); n != 0 {
		t.Fatalf("%d entries applied", n)
	}
	if _, _, err := s.Put(OperatorKey(h), ng); err == nil {
		t.Fatal("a local write of an invalid service was accepted")
	}
}

func TestTombstonesExpire(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	val := CatalogValidator(catalog.Options{})
	s := NewStore("a", val, StoreOptions{TombstoneTTL: time.Hour, Now: clock})
	h := "reviews.default.svc.cluster.local"
	put, _, _ := s.Put(OperatorKey(h), serviceJSON(t, h, 9080))
	del, _ := s.Delete(OperatorKey(h))
	if len(s.All()) != 1 || !s.All()[0].Deleted {
		t.Fatal("tombstone not kept")
	}
	// An old copy of the value arriving now does not undo the delete.
	if changed, _ := s.Merge([]Entry{put}); len(changed) != 0 {
		t.Fatal("old value resurrected a deleted key")
	}
	now = now.Add(2 * time.Hour)
	if n := s.GC(); n != 1 || len(s.All()) != 0 {
		t.Fatalf("GC removed %d, %d left", n, len(s.All()))
	}
	// An expired delete from a peer still removes an older value, but is not stored.
	other := NewStore("b", val, StoreOptions{TombstoneTTL: time.Hour, Now: clock})
	other.Merge([]Entry{put})
	other.Merge([]Entry{del})
	if len(other.All()) != 0 {
		t.Fatalf("expired delete: %+v", other.All())
	}
}

func TestSetDiscoveredReplacesASourcesEntries(t *testing.T) {
	n := startPeer(t, "solo", peerOpts{})
	src := "file:/etc/fwdproxy/catalog.yaml"
	n.SetDiscovered(src, &catalog.Catalog{Services: []catalog.Service{svc("a.default.svc.cluster.local", 1), svc("b.default.svc.cluster.local", 2)}})
	d1, k1 := n.Digest()
	n.SetDiscovered(src, &catalog.Catalog{Services: []catalog.Service{svc("a.default.svc.cluster.local", 1), svc("b.default.svc.cluster.local", 2)}})
	if d2, _ := n.Digest(); d2 != d1 || k1 != 3 {
		t.Fatalf("same catalog changed the store (%d entries)", k1)
	}
	n.SetDiscovered(src, &catalog.Catalog{Services: []catalog.Service{svc("b.default.svc.cluster.local", 3)}})
	live := n.Store().Live(discoveredPrefix(src))
	if len(live) != 1 || live[0].Key != DiscoveredKey(src, "b.default.svc.cluster.local") {
		t.Fatalf("entries after replace: %+v", live)
	}
}

func TestGatewaysAreValidated(t *testing.T) {
	val := CatalogValidator(catalog.Options{})
	good := []byte(`{"name":"primary","port":15443,"addresses":["10.0.0.9","lb.example.internal"]}`)
	if v, err := val("gw/primary", good); err != nil || !json.Valid(v) {
		t.Fatalf("good gateway: %v", err)
	}
	for _, bad := range []struct{ key, value string }{
		{"gw/other", string(good)},
		{"gw/primary", `{"name":"primary","port":0,"addresses":["10.0.0.9"]}`},
		{"gw/primary", `{"name":"primary","port":15443,"addresses":["not an address!"]}`},
		{"gw/Primary", `{"name":"Primary","port":15443,"addresses":[]}`},
	} {
		if _, err := val(bad.key, []byte(bad.value)); err == nil {
			t.Errorf("%s %s accepted", bad.key, bad.value)
		}
	}
}

// A push/pull resends entries the store already holds: they change nothing and are not decoded
// and checked again, while a newer write still is.
func TestMergeSkipsEntriesAlreadyHeld(t *testing.T) {
	var checked atomic.Int32
	validate := CatalogValidator(catalog.Options{})
	counting := func(key string, v []byte) ([]byte, error) {
		checked.Add(1)
		return validate(key, v)
	}
	writer := NewStore("a", validate, StoreOptions{})
	var entries []Entry
	for j := range 50 {
		host := fmt.Sprintf("s%d.default.svc.cluster.local", j)
		e, _, err := writer.Put(OperatorKey(host), serviceJSON(t, host, uint32(8000+j)))
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, e)
	}
	s := NewStore("b", counting, StoreOptions{})
	if changed, rejected := s.Merge(entries); len(changed) != 50 || len(rejected) != 0 {
		t.Fatalf("first merge: %d changed, rejected %v", len(changed), rejected)
	}
	if n := checked.Load(); n != 50 {
		t.Fatalf("first merge checked %d entries, want 50", n)
	}
	before, _ := s.Digest()
	if changed, rejected := s.Merge(writer.All()); len(changed) != 0 || len(rejected) != 0 {
		t.Fatalf("the same entries again: %d changed, rejected %v", len(changed), rejected)
	}
	if n := checked.Load(); n != 50 {
		t.Errorf("entries already held were checked again: %d checks, want 50", n)
	}
	host := "s7.default.svc.cluster.local"
	newer, _, err := writer.Put(OperatorKey(host), serviceJSON(t, host, 9999))
	if err != nil {
		t.Fatal(err)
	}
	if changed, _ := s.Merge(writer.All()); len(changed) != 1 || changed[0].Key != newer.Key {
		t.Fatalf("a newer write among held entries: changed %v", changed)
	}
	if n := checked.Load(); n != 51 {
		t.Errorf("%d checks after one newer write, want 51", n)
	}
	if after, _ := s.Digest(); after == before {
		t.Error("the newer write did not change the store")
	}
}

// The digest follows every kind of write (put, overwrite, delete, merge, an expired delete that
// removes a value) to the digest of a store built from the same contents at once, and reading it
// after a write into a large store costs the same as into a small one: it is read after every
// change, so hashing the whole store again would make a one-entry change cost the whole store.
func TestDigestFollowsWritesAtConstantCost(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	s := NewStore("a", nil, StoreOptions{TombstoneTTL: time.Hour, Now: clock})
	for j := range 10000 {
		if _, _, err := s.Put(fmt.Sprintf("disc/f/s%05d", j), []byte(fmt.Sprintf(`{"n":%d}`, j))); err != nil {
			t.Fatal(err)
		}
	}
	s.Put("disc/f/s00001", []byte(`{"n":"changed"}`))
	s.Delete("disc/f/s00002")
	s.Merge([]Entry{{Key: "op/x", Value: []byte(`{"x":1}`), Time: Timestamp{Wall: now.UnixMilli()}, Node: "b"}})
	// A delete older than the tombstone lifetime removes an older value and is not kept.
	s.Merge([]Entry{{Key: "disc/f/old", Value: []byte(`{"n":3}`), Time: Timestamp{Wall: now.Add(-3 * time.Hour).UnixMilli()}, Node: "b"}})
	s.Merge([]Entry{{Key: "disc/f/old", Time: Timestamp{Wall: now.Add(-2 * time.Hour).UnixMilli()}, Node: "b", Deleted: true}})

	fresh := NewStore("c", nil, StoreOptions{})
	for _, e := range s.All() {
		if !e.Deleted {
			fresh.Put(e.Key, e.Value)
		}
	}
	got, n := s.Digest()
	want, wantN := fresh.Digest()
	if got != want || n != wantN || n != 10000 {
		t.Fatalf("digest %s of %d live entries after the writes, %s of %d for the same contents written at once", got, n, want, wantN)
	}
	if _, ok := s.Get("disc/f/old"); ok || len(s.All()) != 10001 {
		t.Fatalf("the expired delete did not remove the older value (%d entries held)", len(s.All()))
	}

	k := 0
	allocs := testing.AllocsPerRun(20, func() {
		k++
		s.Put("op/x", []byte(fmt.Sprintf(`{"x":%d}`, k)))
		s.Digest()
	})
	if allocs > 40 {
		t.Errorf("a write and a digest allocate %.0f times at 10,000 entries: the digest is recomputed over the whole store", allocs)
	}
}

// Generation moves with the changes to the keys under its prefix only: a reader of 10,000
// discovered services is not made to read them again by an operator entry.
func TestGenerationCountsChangesUnderItsPrefix(t *testing.T) {
	now := time.Now()
	s := NewStore("a", nil, StoreOptions{TombstoneTTL: time.Hour, Now: func() time.Time { return now }})
	s.Put("disc/f/a", []byte(`1`))
	disc, op := s.Generation("disc/f/"), s.Generation("op/")
	s.Put("op/x", []byte(`1`))
	s.Put("op/x", []byte(`1`)) // unchanged: no write
	if g := s.Generation("disc/f/"); g != disc {
		t.Errorf("an operator entry moved the discovered prefix's generation %d -> %d", disc, g)
	}
	if g := s.Generation("op/"); g != op+1 {
		t.Errorf("operator generation %d -> %d after one write, want +1", op, g)
	}
	steps := []struct {
		name  string
		write func()
	}{
		{"put", func() { s.Put("disc/f/b", []byte(`2`)) }},
		{"overwrite", func() { s.Put("disc/f/a", []byte(`3`)) }},
		{"delete", func() { s.Delete("disc/f/b") }},
		{"merge", func() {
			s.Merge([]Entry{{Key: "disc/f/c", Value: []byte(`4`), Time: Timestamp{Wall: now.Add(-3 * time.Hour).UnixMilli()}, Node: "b"}})
		}},
		{"expired delete removing a value", func() {
			s.Merge([]Entry{{Key: "disc/f/c", Time: Timestamp{Wall: now.Add(-2 * time.Hour).UnixMilli()}, Node: "b", Deleted: true}})
		}},
	}
	for _, st := range steps {
		before := s.Generation("disc/f/")
		st.write()
		if g := s.Generation("disc/f/"); g == before {
			t.Errorf("%s under the prefix left its generation at %d", st.name, g)
		}
	}
	if g := s.Generation("op/"); g != op+1 {
		t.Errorf("writes under disc/f/ moved the operator generation to %d", g)
	}
}

// The push/pull state is encoded once per change of the store, not once per exchange, and a
// peer's state byte for byte equal to the one this peer last sent is not decoded again (a
// converged fleet exchanges only such states); any other state is merged as before.
func TestStateIsEncodedOncePerChangeAndAHeldStateNotDecoded(t *testing.T) {
	p := startPeer(t, "solo", peerOpts{})
	d := (*delegate)(p.Node)
	for j := range 2000 {
		host := fmt.Sprintf("s%d.default.svc.cluster.local", j)
		if _, _, err := p.store.Put(OperatorKey(host), serviceJSON(t, host, 8080)); err != nil {
			t.Fatal(err)
		}
	}
	state := d.LocalState(false)
	if allocs := testing.AllocsPerRun(5, func() { d.LocalState(false) }); allocs > 20 {
		t.Errorf("an unchanged store's state costs %.0f allocations per exchange: encoded again", allocs)
	}
	if allocs := testing.AllocsPerRun(5, func() { d.MergeRemoteState(state, false) }); allocs > 20 {
		t.Errorf("a peer's state equal to this one's costs %.0f allocations: decoded again", allocs)
	}

	// A write is in the next state sent; a peer's newer entry arrives in its state.
	host := "new.default.svc.cluster.local"
	if _, _, err := p.store.Put(OperatorKey(host), serviceJSON(t, host, 8081)); err != nil {
		t.Fatal(err)
	}
	_, entries, err := DecodeMessage(d.LocalState(false), MaxStateBytes)
	if err != nil || len(entries) != 2001 {
		t.Fatalf("state after a write: %d entries, %v", len(entries), err)
	}
	other := NewStore("other", CatalogValidator(catalog.Options{}), StoreOptions{})
	other.Merge(entries)
	peerHost := "peer.default.svc.cluster.local"
	if _, _, err := other.Put(OperatorKey(peerHost), serviceJSON(t, peerHost, 8082)); err != nil {
		t.Fatal(err)
	}
	d.MergeRemoteState(encodeMessage(msgState, other.All()), false)
	if _, ok := p.store.Get(OperatorKey(peerHost)); !ok {
		t.Fatal("a peer's newer state was not merged")
	}
}

// TestStateIsTheEncodingOfEveryEntry: the state joined from the kept encodings is byte for byte
// the message encodeMessage makes of the whole store, through writes, merges, deletes and GC;
// peers compare states by their bytes, so a difference would have converged peers decode again.
func TestStateIsTheEncodingOfEveryEntry(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	// No validator: values as they come, with what JSON escapes, keeps or compacts.
	s := NewStore("a", nil, StoreOptions{TombstoneTTL: time.Hour, Now: clock})
	check := func(step string) {
		t.Helper()
		if got, want := s.State(), encodeMessage(msgState, s.All()); !bytes.Equal(got, want) {
			t.Fatalf("%s: state\n%q\nwant\n%q", step, got, want)
		}
	}
	check("empty store")
	for k, v := range map[string]string{
		"operator/html":    `{"x":"<a&b>"}`,
		"operator/unicode": `{"u":"ünï \u2028"}`,
		"operator/spaces":  `{ "y" : [1, 2] , "q": "\"" }`,
		"operator/ünï":     `1`,
	} {
		if _, _, err := s.Put(k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	check("after writes")
	other := NewStore("b", nil, StoreOptions{TombstoneTTL: time.Hour, Now: clock})
	e, _, err := other.Put("operator/merged", []byte(`{"m":true}`))
	if err != nil {
		t.Fatal(err)
	}
	s.Merge([]Entry{e})
	check("after a merge")
	s.Delete("operator/merged")
	check("after a delete")
	now = now.Add(2 * time.Hour)
	if s.GC() != 1 {
		t.Fatal("the tombstone was not collected")
	}
	check("after GC")
	if _, entries, err := DecodeMessage(s.State(), MaxStateBytes); err != nil || len(entries) != 4 {
		t.Fatalf("state decodes to %d entries, %v", len(entries), err)
	}
}

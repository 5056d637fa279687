package discovery

import (
	"reflect"
	"slices"
	"strings"
	"sync"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// maxIncremental is the number of changed hosts a Merger patches in; more than that (a new
// discovery) is merged again from scratch, which then costs no more than the patch would.
const maxIncremental = 256

// Merger is Merge for a caller that merges the same sources again after each change: it keeps
// the last merge's result and, when only a few hosts changed in its inputs (one operator entry
// among 10,000 discovered services), merges and checks only those hosts against the rest
// instead of cloning, checking and sorting the whole catalog again. Its result is always the one
// Merge would return; whatever it cannot patch with certainty (a service left out before or now,
// a collision, other options, other sources) is merged from scratch. Safe for concurrent use.
//
// The catalogs passed in, and the one returned, must not be modified afterwards: unchanged
// services are shared between successive results.
type Merger struct {
	mu      sync.Mutex
	st      *mergeState // nil: the next merge starts from scratch
	scratch int         // merges done from scratch (tests)
}

// mergeState is what the last merge saw and produced.
type mergeState struct {
	opts    catalog.Options
	cats    []*catalog.Catalog
	index   []catIndex                 // per input catalog: where each host is
	merged  map[string]catalog.Service // input host -> its service in out
	shadow  map[string][]conflictAt    // input host -> the conflicts its later entries raised
	out     *catalog.Catalog           // sorted by host, as Merge returns it
	names   map[string]int             // claimed host names (hosts, aliases, subset hosts)
	tcp     map[uint32]int             // services using each port as TCP
	nonTCP  map[uint32]int             // services using each port otherwise
	counted bool                       // names/tcp/nonTCP are filled
}

type conflictAt struct {
	cat, pos int
	err      error
}

// Merge returns what Merge(opts, cats...) returns.
func (m *Merger) Merge(opts catalog.Options, cats ...*catalog.Catalog) (*catalog.Catalog, []error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st != nil {
		if out, conflicts, ok := m.st.patch(opts, cats); ok {
			return out, conflicts
		}
	}
	out, conflicts := Merge(opts, cats...)
	m.scratch++
	m.st = newMergeState(opts, cats, out)
	return out, conflicts
}

// newMergeState records a from-scratch merge; nil when a service was left out (the patch
// assumes every service of the inputs is in the result).
func newMergeState(opts catalog.Options, cats []*catalog.Catalog, out *catalog.Catalog) *mergeState {
	st := &mergeState{opts: opts, cats: slices.Clone(cats), index: make([]catIndex, len(cats)),
		merged: make(map[string]catalog.Service, len(out.Services)), shadow: map[string][]conflictAt{}, out: out}
	hosts := map[string]bool{}
	for i, c := range cats {
		st.index[i] = indexOf(c)
		for h := range st.index[i].first {
			hosts[h] = true
		}
	}
	for h := range hosts {
		s, _ := st.mergeHost(h)
		st.merged[h] = s
	}
	if len(st.merged) != len(out.Services) {
		return nil
	}
	return st
}

// catIndex locates the hosts of one input catalog: the first position of each, and every
// position of a host listed more than once (Merge sees each of those entries).
type catIndex struct {
	first map[string]int
	more  map[string][]int
}

func indexOf(c *catalog.Catalog) catIndex {
	idx := catIndex{first: map[string]int{}}
	if c == nil {
		return idx
	}
	idx.first = make(map[string]int, len(c.Services))
	for j, s := range c.Services {
		if k, ok := idx.first[s.Host]; ok {
			if idx.more == nil {
				idx.more = map[string][]int{}
			}
			if len(idx.more[s.Host]) == 0 {
				idx.more[s.Host] = []int{k}
			}
			idx.more[s.Host] = append(idx.more[s.Host], j)
			continue
		}
		idx.first[s.Host] = j
	}
	return idx
}

func (x catIndex) positions(h string) []int {
	if more, ok := x.more[h]; ok {
		return more
	}
	if j, ok := x.first[h]; ok {
		return []int{j}
	}
	return nil
}

// mergeHost merges host's entries of every input in priority order, as Merge does, recording
// the conflicts its later entries raise; the result is normalized.
func (st *mergeState) mergeHost(h string) (catalog.Service, bool) {
	var s catalog.Service
	found := false
	delete(st.shadow, h)
	for i, c := range st.cats {
		for _, j := range st.index[i].positions(h) {
			if !found {
				s, found = c.Services[j].Clone(), true
				continue
			}
			if err := mergeClusters(&s, c.Services[j]); err != nil {
				st.shadow[h] = append(st.shadow[h], conflictAt{cat: i, pos: j, err: err})
			}
		}
	}
	if found {
		one := catalog.Catalog{Services: []catalog.Service{s}}
		one.Normalize()
		s = one.Services[0]
	}
	return s, found
}

// patch merges cats by changing only the hosts that changed since the last merge; ok false when
// it cannot (the caller merges from scratch).
func (st *mergeState) patch(opts catalog.Options, cats []*catalog.Catalog) (*catalog.Catalog, []error, bool) {
	if len(cats) != len(st.cats) || !reflect.DeepEqual(opts, st.opts) {
		return nil, nil, false
	}
	changed := map[string]bool{}
	newIndex := slices.Clone(st.index)
	for i, c := range cats {
		if c == st.cats[i] {
			continue
		}
		newIndex[i] = indexOf(c)
		for h, j := range newIndex[i].first {
			k, ok := st.index[i].first[h]
			_, dup := newIndex[i].more[h]
			_, wasDup := st.index[i].more[h]
			if !ok || dup || wasDup || !reflect.DeepEqual(c.Services[j], st.cats[i].Services[k]) {
				changed[h] = true
			}
		}
		for h := range st.index[i].first {
			if _, ok := newIndex[i].first[h]; !ok {
				changed[h] = true
			}
		}
		if len(changed) > maxIncremental {
			return nil, nil, false
		}
	}
	if !st.counted {
		st.countClaims()
	}
	// From here on the state is being changed: a failure leaves it to be rebuilt.
	oldCats, oldIndex := st.cats, st.index
	st.cats, st.index = slices.Clone(cats), newIndex
	fail := func() (*catalog.Catalog, []error, bool) {
		st.cats, st.index = oldCats, oldIndex
		st.counted = false
		return nil, nil, false
	}
	hosts := make([]string, 0, len(changed))
	for h := range changed {
		hosts = append(hosts, h)
	}
	slices.Sort(hosts)
	next := map[string]catalog.Service{}
	oldShadow := map[string][]conflictAt{}
	for _, h := range hosts {
		oldShadow[h] = st.shadow[h]
		if s, ok := st.mergeHost(h); ok {
			next[h] = s
		}
	}
	restore := func() {
		for h, c := range oldShadow {
			if c == nil {
				delete(st.shadow, h)
			} else {
				st.shadow[h] = c
			}
		}
	}
	// The changed services checked alone and among themselves (a service's own fields, the
	// options' gateways and reserved ports), then against the claims of the unchanged rest.
	fresh := &catalog.Catalog{}
	for _, h := range hosts {
		if s, ok := next[h]; ok {
			fresh.Services = append(fresh.Services, s)
		}
	}
	if len(fresh.Problems(opts)) > 0 {
		restore()
		return fail()
	}
	for _, h := range hosts {
		if s, ok := st.merged[h]; ok {
			st.claim(s, -1)
		}
	}
	for _, s := range fresh.Services {
		st.claim(s, +1)
	}
	collide := false
	for _, s := range fresh.Services {
		collide = collide || st.collides(s)
	}
	if collide {
		// Undo the counts so that the state stays consistent for the next try from scratch.
		for _, s := range fresh.Services {
			st.claim(s, -1)
		}
		for _, h := range hosts {
			if s, ok := st.merged[h]; ok {
				st.claim(s, +1)
			}
		}
		restore()
		return fail()
	}
	// The result: the last one with the changed hosts taken out and their new services put in,
	// sorted by host as Merge sorts.
	gone := map[string]bool{}
	for _, h := range hosts {
		if s, ok := st.merged[h]; ok {
			gone[s.Host] = true
		}
		if s, ok := next[h]; ok {
			st.merged[h] = s
		} else {
			delete(st.merged, h)
		}
	}
	slices.SortFunc(fresh.Services, func(a, b catalog.Service) int { return strings.Compare(a.Host, b.Host) })
	// What the patch returns is what Merge would (TestMergerMatchesMerge), Checked included.
	out := &catalog.Catalog{Services: make([]catalog.Service, 0, len(st.out.Services)+len(fresh.Services)), Checked: st.out.Checked}
	add := fresh.Services
	for _, s := range st.out.Services {
		if gone[s.Host] {
			continue
		}
		for len(add) > 0 && add[0].Host < s.Host {
			out.Services, add = append(out.Services, add[0]), add[1:]
		}
		out.Services = append(out.Services, s)
	}
	out.Services = append(out.Services, add...)
	if len(out.Services) == 0 {
		out.Services = nil // as Merge returns an empty catalog
	}
	st.out = out
	// A changed input moves its entries: the conflicts the unchanged hosts raised are placed
	// again, so that they are reported in Merge's order.
	var again []string
	for h := range st.shadow {
		if !changed[h] {
			again = append(again, h)
		}
	}
	for _, h := range again {
		st.mergeHost(h)
	}
	return out, st.conflicts(), true
}

// conflicts lists the recorded conflicts in the order Merge reports them: by input, then by
// position in it.
func (st *mergeState) conflicts() []error {
	var all []conflictAt
	for _, cs := range st.shadow {
		all = append(all, cs...)
	}
	if len(all) == 0 {
		return nil
	}
	slices.SortFunc(all, func(a, b conflictAt) int {
		if a.cat != b.cat {
			return a.cat - b.cat
		}
		return a.pos - b.pos
	})
	out := make([]error, len(all))
	for i, c := range all {
		out[i] = c.err
	}
	return out
}

// countClaims counts, over the last result, the services claiming each host name and port, as
// catalog.Problems checks them: a name once, a TCP port by one service alone.
func (st *mergeState) countClaims() {
	st.names, st.tcp, st.nonTCP = map[string]int{}, map[uint32]int{}, map[uint32]int{}
	for _, s := range st.out.Services {
		st.claim(s, +1)
	}
	st.counted = true
}

func (st *mergeState) claim(s catalog.Service, d int) {
	for _, n := range claimedNames(s) {
		st.names[n] += d
	}
	for _, p := range s.Ports {
		if p.Protocol == catalog.TCP {
			st.tcp[p.Number] += d
		} else {
			st.nonTCP[p.Number] += d
		}
	}
}

func (st *mergeState) collides(s catalog.Service) bool {
	for _, n := range claimedNames(s) {
		if st.names[n] > 1 {
			return true
		}
	}
	for _, p := range s.Ports {
		if t := st.tcp[p.Number]; t > 1 || (t == 1 && st.nonTCP[p.Number] > 0) {
			return true
		}
	}
	return false
}

// claimedNames are the host names a (normalized) service claims.
func claimedNames(s catalog.Service) []string {
	out := append([]string{s.Host}, s.Aliases...)
	for _, sub := range s.Subsets {
		out = append(out, sub.Hosts...)
	}
	return out
}

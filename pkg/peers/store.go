package peers

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Timestamp is a hybrid logical clock reading: wall-clock milliseconds plus a logical counter that
// orders events within the same millisecond and events received from peers whose clocks run ahead.
type Timestamp struct {
	Wall    int64  `json:"w"`
	Logical uint32 `json:"l"`
}

// Compare orders timestamps: -1, 0 or +1.
func (t Timestamp) Compare(o Timestamp) int {
	switch {
	case t.Wall != o.Wall:
		return cmpInt(t.Wall, o.Wall)
	case t.Logical != o.Logical:
		return cmpInt(int64(t.Logical), int64(o.Logical))
	}
	return 0
}

func cmpInt(a, b int64) int {
	if a < b {
		return -1
	}
	if a > b {
		return 1
	}
	return 0
}

// Clock is a hybrid logical clock (Kulkarni et al.): its readings never go backwards, stay close
// to wall time, and move past every timestamp it has observed, so a write made after seeing
// another write always wins over it regardless of clock skew between the two hosts.
type Clock struct {
	mu   sync.Mutex
	last Timestamp
	now  func() time.Time
}

// Now returns a timestamp greater than every earlier reading and every observed one.
func (c *Clock) Now() Timestamp {
	c.mu.Lock()
	defer c.mu.Unlock()
	wall := c.now().UnixMilli()
	if wall > c.last.Wall {
		c.last = Timestamp{Wall: wall}
	} else {
		c.last.Logical++
	}
	return c.last
}

// Observe moves the clock past a timestamp received from a peer.
func (c *Clock) Observe(t Timestamp) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.Compare(c.last) > 0 {
		c.last = t
	}
}

// Entry is one key of the replicated store. A deleted entry (tombstone) has no value and is kept
// for the store's tombstone lifetime so the delete reaches every peer before it is forgotten.
type Entry struct {
	Key     string          `json:"k"`
	Value   json.RawMessage `json:"v,omitempty"`
	Time    Timestamp       `json:"t"`
	Node    string          `json:"n"`
	Deleted bool            `json:"d,omitempty"`
}

// Newer reports whether e wins over o under last-writer-wins: the later timestamp, then the
// greater node name; the remaining tie-breaks only make the order total (deterministic merge).
func (e *Entry) Newer(o *Entry) bool {
	if c := e.Time.Compare(o.Time); c != 0 {
		return c > 0
	}
	if c := strings.Compare(e.Node, o.Node); c != 0 {
		return c > 0
	}
	if e.Deleted != o.Deleted {
		return e.Deleted
	}
	return bytes.Compare(e.Value, o.Value) > 0
}

// Validator checks an entry's value before it is accepted and returns its canonical form, so that
// equal contents are equal bytes on every peer. It is not called for tombstones.
type Validator func(key string, value []byte) ([]byte, error)

// ErrClockSkew rejects entries stamped too far in the future: such an entry would win every merge
// until the wall clock caught up with it.
var ErrClockSkew = errors.New("timestamp too far in the future")

// Store is a last-writer-wins map replicated between peers. Merge is commutative, associative and
// idempotent, so peers that have seen the same writes hold the same contents in any order.
type Store struct {
	node     string
	clock    *Clock
	validate Validator
	ttl      time.Duration
	maxSkew  time.Duration
	now      func() time.Time
	mu       sync.RWMutex
	entries  map[string]*Entry
	// sum is the XOR of the live entries' hashes (entryHash) and live their number: the digest
	// follows each write in O(1) instead of hashing the whole store again.
	sum  [sha256.Size]byte
	live int
	gens map[string]uint64 // watched prefix -> changes to its keys (Generation)
	// wire holds each entry's encoding in a state message, made once per write: a push/pull
	// after one change then joins 10,000 encodings instead of encoding them all again.
	wire      map[string][]byte
	changedCh chan struct{}
}

// StoreOptions tune a Store; zero values take the defaults.
type StoreOptions struct {
	// TombstoneTTL is how long a delete is remembered; default 24h. A peer cut off for longer than
	// this can bring a deleted key back when it returns.
	TombstoneTTL time.Duration
	// MaxClockSkew rejects entries stamped further ahead of local time; default 5m.
	MaxClockSkew time.Duration
	// Now is the wall clock; default time.Now.
	Now func() time.Time
}

// NewStore returns an empty store for node; validate may be nil.
func NewStore(node string, validate Validator, o StoreOptions) *Store {
	if o.TombstoneTTL == 0 {
		o.TombstoneTTL = 24 * time.Hour
	}
	if o.MaxClockSkew == 0 {
		o.MaxClockSkew = 5 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if validate == nil {
		validate = func(_ string, v []byte) ([]byte, error) { return v, nil }
	}
	return &Store{
		node: node, clock: &Clock{now: o.Now}, validate: validate, ttl: o.TombstoneTTL,
		maxSkew: o.MaxClockSkew, now: o.Now, entries: map[string]*Entry{}, gens: map[string]uint64{},
		wire: map[string][]byte{}, changedCh: make(chan struct{}),
	}
}

// Changed returns a channel closed at the next change of the contents.
func (s *Store) Changed() <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.changedCh
}

// Generation counts the changes to the keys under prefix since prefix was first asked about
// (the first call returns 0): a reader of one prefix tells in O(1) whether it has to read it
// again, where the store holds 10,000 entries of another prefix.
func (s *Store) Generation(prefix string) uint64 {
	s.mu.RLock()
	g, ok := s.gens[prefix]
	s.mu.RUnlock()
	if ok {
		return g
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.gens[prefix]; !ok {
		s.gens[prefix] = 0
	}
	return s.gens[prefix]
}

// setLocked replaces key's entry (nil removes it), keeps the digest's sum and the watched
// prefixes' generations current, and wakes watchers; s.mu is held for writing.
func (s *Store) setLocked(key string, e *Entry) {
	if cur := s.entries[key]; cur != nil && !cur.Deleted {
		s.toggleLocked(cur)
		s.live--
	}
	if e == nil {
		delete(s.entries, key)
		delete(s.wire, key)
	} else {
		s.entries[key] = e
		s.wire[key] = encodeEntry(e)
		if !e.Deleted {
			s.toggleLocked(e)
			s.live++
		}
	}
	for p := range s.gens {
		if strings.HasPrefix(key, p) {
			s.gens[p]++
		}
	}
	close(s.changedCh)
	s.changedCh = make(chan struct{})
}

// toggleLocked adds a live entry's hash to the sum, or takes it out again (XOR).
func (s *Store) toggleLocked(e *Entry) {
	h := sha256.New()
	fmt.Fprintf(h, "%d:%s%d:", len(e.Key), e.Key, len(e.Value))
	h.Write(e.Value)
	var b [sha256.Size]byte
	for i, x := range h.Sum(b[:0]) {
		s.sum[i] ^= x
	}
}

// Put writes a value locally and returns the entry to broadcast. An unchanged value is not
// rewritten (ok false), so repeated writes of the same contents cause no traffic.
func (s *Store) Put(key string, value []byte) (Entry, bool, error) {
	if err := checkKey(key); err != nil {
		return Entry{}, false, err
	}
	v, err := s.validate(key, value)
	if err != nil {
		return Entry{}, false, err
	}
	if len(v) > MaxValueBytes {
		return Entry{}, false, fmt.Errorf("%s: value is %d bytes, over the %d byte limit", key, len(v), MaxValueBytes)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur := s.entries[key]; cur != nil && !cur.Deleted && bytes.Equal(cur.Value, v) {
		return *cur, false, nil
	}
	e := &Entry{Key: key, Value: v, Time: s.clock.Now(), Node: s.node}
	s.setLocked(key, e)
	return *e, true, nil
}

// Delete writes a tombstone for a live key (ok false when there is nothing to delete).
func (s *Store) Delete(key string) (Entry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.entries[key]
	if cur == nil || cur.Deleted {
		return Entry{}, false
	}
	e := &Entry{Key: key, Time: s.clock.Now(), Node: s.node, Deleted: true}
	s.setLocked(key, e)
	return *e, true
}

// Merge applies entries from a peer. It returns the entries that changed the local contents
// (to be passed on) and one error per rejected entry; rejected entries are never applied.
func (s *Store) Merge(in []Entry) (changed []Entry, rejected []error) {
	now := s.now()
	horizon := now.Add(s.maxSkew).UnixMilli()
	expired := now.Add(-s.ttl).UnixMilli()
	// A push/pull resends the whole store: what is no newer than the entry held would be
	// dropped below anyway, so it is dropped before the decoding and checks, which would
	// otherwise be most of a periodic exchange's cost at 10,000 entries.
	fresh := make([]Entry, 0, len(in))
	s.mu.RLock()
	for _, e := range in {
		if cur := s.entries[e.Key]; cur == nil || e.Newer(cur) {
			fresh = append(fresh, e)
		}
	}
	s.mu.RUnlock()
	// Validate outside the lock: it decodes and checks catalog entries.
	ok := make([]Entry, 0, len(fresh))
	for _, e := range fresh {
		if err := checkEntry(&e); err != nil {
			rejected = append(rejected, err)
			continue
		}
		if e.Time.Wall > horizon {
			rejected = append(rejected, fmt.Errorf("%s from %s: %w (%s)", e.Key, e.Node, ErrClockSkew, time.UnixMilli(e.Time.Wall).UTC().Format(time.RFC3339)))
			continue
		}
		if !e.Deleted {
			v, err := s.validate(e.Key, e.Value)
			if err != nil {
				rejected = append(rejected, fmt.Errorf("%s from %s: %w", e.Key, e.Node, err))
				continue
			}
			e.Value = v
		}
		ok = append(ok, e)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range ok {
		e := ok[i]
		s.clock.Observe(e.Time)
		cur := s.entries[e.Key]
		if cur != nil && !e.Newer(cur) {
			continue
		}
		if e.Deleted && e.Time.Wall < expired {
			// A delete older than the tombstone lifetime still removes an older value but is not kept.
			if cur != nil {
				s.setLocked(e.Key, nil)
			}
			continue
		}
		s.setLocked(e.Key, &e)
		changed = append(changed, e)
	}
	return changed, rejected
}

// GC forgets tombstones older than the tombstone lifetime.
func (s *Store) GC() int {
	expired := s.now().Add(-s.ttl).UnixMilli()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, e := range s.entries {
		if e.Deleted && e.Time.Wall < expired {
			delete(s.entries, k)
			delete(s.wire, k)
			n++
			for p := range s.gens {
				if strings.HasPrefix(k, p) {
					s.gens[p]++ // All() changed
				}
			}
		}
	}
	return n
}

// All returns every entry, tombstones included, sorted by key: the full state for anti-entropy.
func (s *Store) All() []Entry {
	s.mu.RLock()
	out := make([]Entry, 0, len(s.entries))
	for _, e := range s.entries {
		out = append(out, *e)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b Entry) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// State is the push/pull state message: every entry, tombstones included, sorted by key, the
// same bytes as encodeMessage(msgState, s.All()), joined from the encodings kept per entry.
func (s *Store) State() []byte {
	s.mu.RLock()
	keys := make([]string, 0, len(s.wire))
	size := 0
	for k, w := range s.wire {
		keys = append(keys, k)
		size += len(w) + 1
	}
	slices.Sort(keys)
	buf := make([]byte, 0, size+16)
	buf = append(buf, wireVersion, msgState)
	buf = append(buf, `{"e":[`...)
	for i, k := range keys {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, s.wire[k]...)
	}
	s.mu.RUnlock()
	return append(buf, "]}\n"...)
}

// Live returns the live entries whose key starts with prefix, sorted by key.
func (s *Store) Live(prefix string) []Entry {
	s.mu.RLock()
	var out []Entry
	for k, e := range s.entries {
		if !e.Deleted && strings.HasPrefix(k, prefix) {
			out = append(out, *e)
		}
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b Entry) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// Get returns a live entry.
func (s *Store) Get(key string) (Entry, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e := s.entries[key]
	if e == nil || e.Deleted {
		return Entry{}, false
	}
	return *e, true
}

// Digest is a hash of the live contents (keys and values, not timestamps or tombstones): peers
// holding the same configuration report the same digest however they came by it. It hashes the
// XOR of the live entries' hashes, kept current by every write, so it costs the same at any size
// (it is read after every change, for the metadata each member advertises).
func (s *Store) Digest() (digest string, live int) {
	s.mu.RLock()
	sum, live := s.sum, s.live
	s.mu.RUnlock()
	h := sha256.New()
	fmt.Fprintf(h, "%d:", live)
	h.Write(sum[:])
	return hex.EncodeToString(h.Sum(nil)[:12]), live
}

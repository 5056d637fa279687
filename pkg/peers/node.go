// Package peers keeps the fleet's configuration identical on every instance: membership and
// failure detection by gossip (hashicorp/memberlist, SWIM), and a replicated last-writer-wins
// store of catalog entries. Changes spread as broadcasts piggybacked on gossip; the full state is
// exchanged by periodic push/pull (anti-entropy) and on join, so a new or returning peer receives
// everything. Each peer advertises a digest of its store in its member metadata, which makes
// convergence visible from any peer.
package peers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fwdproxy/fwdproxy/internal/ratelog"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Config configures a Node.
type Config struct {
	// Name is this peer's unique name (the daemon's node.id).
	Name string
	// Bind is the gossip address, host:port (UDP and TCP).
	Bind string
	// Advertise is the address peers use to reach this one; default: derived from Bind.
	Advertise string
	// Seeds are peers (host:port) to join; Discover, when set, finds more (e.g. AWS).
	Seeds    []string
	Discover func(ctx context.Context) ([]string, error)
	// Keys is the gossip keyring, the first key used to encrypt; empty disables encryption.
	Keys [][]byte
	// Profile picks memberlist's timings: "lan" (default), "wan" or "local".
	Profile string
	// Tune adjusts memberlist's config after the profile (tests, benchmarks).
	Tune func(*memberlist.Config)
	// Transport replaces memberlist's UDP/TCP transport (tests).
	Transport memberlist.Transport
	// CatalogOptions validates services received from peers.
	CatalogOptions catalog.Options
	// Store tunes tombstones and clock skew.
	Store StoreOptions
	// RejoinInterval is how often a peer that sees fewer members than it has seeds tries its
	// seeds again (heals partitions longer than memberlist's gossip-to-the-dead time); default 30s.
	RejoinInterval time.Duration
	Log            *slog.Logger
	// Registerer receives the fwdproxy_gossip_* metrics; nil skips them.
	Registerer prometheus.Registerer
}

// Node is one peer of the fleet.
type Node struct {
	cfg     Config
	log     *slog.Logger
	store   *Store
	ml      *memberlist.Memberlist
	queue   *memberlist.TransmitLimitedQueue
	maxCast int // largest delta that fits in a gossip packet
	metrics *metrics
	// logLimit keeps repeated lines about rejected messages from flooding the log.
	logLimit ratelog.Limiter

	kick chan struct{}
	// rejoin wakes the join loop when a member fails, so a peer cut off from the fleet starts
	// retrying at once (with backoff) instead of after the rest of RejoinInterval.
	rejoin chan struct{}
	cancel context.CancelFunc
	done   chan struct{}

	mu          sync.Mutex
	leader      bool
	leaderKnown bool
	leaderCh    chan bool
	advertised  string // digest in our current metadata
	// lastExchange is when exchangeState last ran.
	lastExchange time.Time
	closed       atomic.Bool

	// table holds copies of the members as reported by memberlist's events: the *Node values
	// memberlist.Members returns are updated in place by its goroutines and are unsafe to read.
	tableMu sync.Mutex
	table   map[string]memberlist.Node
	// lost are members that failed or left, by address, with when: they are
	// tried again with the seeds for lostRetention, so a partition heals even after memberlist
	// has stopped gossiping to the dead and when no seed is on the other side.
	lost map[string]time.Time
	// suspect are members this peer's probes failed, since when (health.go); gone are members
	// that failed or left, kept for status.
	suspect map[string]time.Time
	gone    map[string]gone
	// synced is set once this peer holds the fleet's full state (health.go).
	synced     atomic.Bool
	syncedCh   chan struct{} // closed when synced is set
	syncedOnce sync.Once
	// unreached: the last join attempt had peers to contact and reached none.
	unreached atomic.Bool
	// leaving is set by Close: the metadata then tells peers this is a departure, not a failure.
	leaving atomic.Bool

	// What this peer's discovery last reported, rewritten if a merge replaces it while this
	// peer leads (writes of a former or partitioned leader lose to the current one's view).
	ownedMu     sync.Mutex
	owned       map[string]*catalog.Catalog
	ownedGW     map[string]Gateway
	foreignDisc atomic.Bool
	// joinTried is set after the first attempt to join the seeds: until then a peer does not
	// lead, so a starting instance does not briefly run discovery alone.
	joinTried atomic.Bool
}

// lostRetention is how long a failed member's address is retried.
const lostRetention = time.Hour

// maxQueued bounds the broadcast queue.
const maxQueued = 4096

// Member is what a peer knows about one member of the fleet.
type Member struct {
	Name   string `json:"name"`
	Addr   string `json:"addr"`
	State  string `json:"state"` // alive, suspect, dead or left (health.go)
	Digest string `json:"digest"`
	Leader bool   `json:"leader"`
	// Since is when a suspect, dead or left member entered that state.
	Since time.Time `json:"since,omitzero"`
}

// Start creates the local peer, joins the seeds in the background (retrying with backoff) and
// returns. Close leaves the fleet.
func Start(cfg Config) (*Node, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.RejoinInterval == 0 {
		cfg.RejoinInterval = 30 * time.Second
	}
	var mc *memberlist.Config
	switch cfg.Profile {
	case "", "lan":
		mc = memberlist.DefaultLANConfig()
	case "wan":
		mc = memberlist.DefaultWANConfig()
	case "local":
		mc = memberlist.DefaultLocalConfig()
	default:
		return nil, fmt.Errorf("timing profile %q: use lan, wan or local", cfg.Profile)
	}
	if cfg.Name == "" {
		return nil, errors.New("a peer needs a name")
	}
	mc.Name = cfg.Name
	host, port, err := splitHostPort(cfg.Bind)
	if err != nil {
		return nil, fmt.Errorf("bind: %w", err)
	}
	mc.BindAddr, mc.BindPort = host, port
	mc.AdvertisePort = port
	if cfg.Advertise != "" {
		if mc.AdvertiseAddr, mc.AdvertisePort, err = splitHostPort(cfg.Advertise); err != nil {
			return nil, fmt.Errorf("advertise: %w", err)
		}
	}
	if len(cfg.Keys) > 0 {
		kr, err := memberlist.NewKeyring(cfg.Keys, cfg.Keys[0])
		if err != nil {
			return nil, fmt.Errorf("keyring: %w", err)
		}
		mc.Keyring = kr
	}
	if cfg.Tune != nil {
		cfg.Tune(mc)
	}
	if cfg.Transport != nil {
		mc.Transport = cfg.Transport
	}
	n := &Node{
		cfg:      cfg,
		log:      cfg.Log,
		store:    NewStore(cfg.Name, CatalogValidator(cfg.CatalogOptions), cfg.Store),
		kick:     make(chan struct{}, 1),
		rejoin:   make(chan struct{}, 1),
		done:     make(chan struct{}),
		leaderCh: make(chan bool, 1),
		table:    map[string]memberlist.Node{},
		lost:     map[string]time.Time{},
		suspect:  map[string]time.Time{},
		syncedCh: make(chan struct{}),
		gone:     map[string]gone{},
		owned:    map[string]*catalog.Catalog{},
		ownedGW:  map[string]Gateway{},
	}
	n.metrics = newMetrics(n, cfg.Registerer)
	mc.Delegate = (*delegate)(n)
	mc.Events = (*events)(n)
	mc.Ping = (*pings)(n)
	mc.Logger = newMemberlistLogger(n)
	// Room for a delta in one packet: memberlist's compound/label/encryption overheads included.
	n.maxCast = mc.UDPBufferSize - 200
	// Each peer that learns an entry passes it on this many times log10(members+1): with 6, a
	// peer misses a change by broadcast with probability about e^-12 (it would still get it by
	// push/pull), where memberlist's own default of 4 leaves a few percent of changes to wait
	// for anti-entropy in a fleet of 32.
	n.queue = &memberlist.TransmitLimitedQueue{NumNodes: n.numMembers, RetransmitMult: max(mc.RetransmitMult, 6)}
	n.advertised, _ = n.store.Digest()
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("start gossip on %s: %w", cfg.Bind, err)
	}
	n.ml = ml
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go n.loop(ctx)
	return n, nil
}

func splitHostPort(addr string) (string, int, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("%q has an invalid port", addr)
	}
	if h == "" {
		h = "0.0.0.0"
	}
	return h, port, nil
}

func (n *Node) numMembers() int {
	if n.ml == nil {
		return 1
	}
	return n.ml.NumMembers()
}

// Name is this peer's name.
func (n *Node) Name() string { return n.cfg.Name }

// Addr is the address peers reach this one at.
func (n *Node) Addr() string { return n.ml.LocalNode().Address() }

// Store is the replicated store (read it; write through the Node so changes are sent).
func (n *Node) Store() *Store { return n.store }

// Close leaves the fleet gracefully (peers learn at once, not by failure detection) and stops.
func (n *Node) Close() error {
	if n.closed.Swap(true) {
		return nil
	}
	n.cancel()
	<-n.done
	// Say it is a departure first, so peers list this peer as left rather than dead. The leave
	// message below replaces a metadata update still queued, so wait for this one to go out.
	n.leaving.Store(true)
	if err := n.ml.UpdateNode(2 * time.Second); err != nil {
		n.log.Debug("departure not announced before leaving", "error", err)
	}
	err := n.ml.Leave(2 * time.Second)
	return errors.Join(err, n.ml.Shutdown())
}

// Join contacts the given peers now; it returns how many answered.
func (n *Node) Join(addrs []string) (int, error) { return n.ml.Join(addrs) }

// loop keeps the advertised digest and leadership current and collects tombstones.
func (n *Node) loop(ctx context.Context) {
	defer close(n.done)
	var joins sync.WaitGroup
	joins.Add(1)
	go func() { defer joins.Done(); n.joinLoop(ctx) }()
	defer joins.Wait()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	gc := time.NewTicker(time.Minute)
	defer gc.Stop()
	for {
		n.refresh()
		select {
		case <-ctx.Done():
			return
		case <-n.kick:
			// Let a burst of changes settle into one metadata update.
			select {
			case <-ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		case <-tick.C:
			// A burst larger than this (a first discovery of thousands of services) is left to
			// push/pull rather than queued for gossip indefinitely.
			if n.queue.NumQueued() > maxQueued {
				n.queue.Prune(maxQueued)
				n.exchangeState(ctx)
			}
		case <-gc.C:
			if k := n.store.GC(); k > 0 {
				n.log.Debug("forgot expired deletes", "count", k)
			}
		}
	}
}

// exchangeState pushes and pulls the whole store with every member now (memberlist's Join does
// exactly that exchange), once per interval at most: after a burst too large for broadcasts,
// the members get it at once instead of at their next periodic push/pull (30s on a LAN).
func (n *Node) exchangeState(ctx context.Context) {
	now := time.Now()
	n.mu.Lock()
	if now.Sub(n.lastExchange) < 5*time.Second {
		n.mu.Unlock()
		return
	}
	n.lastExchange = now
	n.mu.Unlock()
	var addrs []string
	for _, m := range n.memberList() {
		if m.Name != n.cfg.Name {
			addrs = append(addrs, m.Address())
		}
	}
	if len(addrs) == 0 {
		return
	}
	go func() {
		if ctx.Err() != nil {
			return
		}
		if k, err := n.ml.Join(addrs); err != nil {
			n.log.Debug("state exchange after a large change incomplete; periodic push/pull will finish it", "reached", k, "error", err)
		}
	}()
}

// joinLoop joins the seeds at start, retrying with backoff until one answers, then checks every
// RejoinInterval for seeds that are not members (a healed partition, a restarted fleet).
func (n *Node) joinLoop(ctx context.Context) {
	wait, joined := time.Duration(0), false
	for {
		ok := n.joinSeeds(ctx, joined)
		if !n.joinTried.Swap(true) {
			n.poke()
		}
		if ok {
			joined, wait = true, n.cfg.RejoinInterval
		} else {
			// Back off 1s, 2s, 4s ... 30s, with jitter, until a seed answers.
			wait = min(max(2*wait, time.Second), 30*time.Second)
			wait = wait/2 + rand.N(wait/2+1)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		case <-n.rejoin:
			wait = 0 // a member just failed: retry now, then back off from 1s if nobody answers
		}
	}
}

// joinSeeds joins seeds that are not members yet. It reports success when there is nothing left
// to do or a seed answered.
func (n *Node) joinSeeds(ctx context.Context, joinedBefore bool) bool {
	seeds := slices.Clone(n.cfg.Seeds)
	configured := len(seeds) > 0 || n.cfg.Discover != nil
	if n.cfg.Discover != nil {
		found, err := n.cfg.Discover(ctx)
		if err != nil {
			n.log.Warn("peer discovery failed; retrying", "error", err)
			if len(seeds) == 0 {
				return false
			}
		}
		seeds = append(seeds, found...)
	}
	n.tableMu.Lock()
	for addr, when := range n.lost {
		if time.Since(when) > lostRetention {
			delete(n.lost, addr)
		} else if !slices.Contains(seeds, addr) {
			seeds = append(seeds, addr)
		}
	}
	n.tableMu.Unlock()
	known := map[string]bool{}
	for _, m := range n.memberList() {
		known[m.Address()] = true
	}
	var todo []string
	for _, s := range seeds {
		if !known[s] {
			todo = append(todo, s)
		}
	}
	if len(todo) == 0 {
		n.unreached.Store(false)
		if n.ml.NumMembers() <= 1 {
			n.setSynced() // no other peer exists to hold any state: the first of a fleet
		}
		return true
	}
	k, err := n.ml.Join(todo)
	n.unreached.Store(k == 0 && n.ml.NumMembers() <= 1)
	if k > 0 {
		if !joinedBefore {
			n.log.Info("joined the fleet", "contacted", k, "members", n.ml.NumMembers())
		}
		return true
	}
	if !configured {
		n.setSynced()
	}
	if n.ml.NumMembers() > 1 || !configured {
		return true // already in a fleet, or only former members were tried
	}
	n.log.Warn("cannot reach any peer yet; retrying (if every peer rejects us, check that peers.keyring matches the fleet's)",
		"seeds", todo, "error", err)
	return false
}

// refresh advertises the current digest and recomputes leadership.
func (n *Node) refresh() {
	digest, _ := n.store.Digest()
	n.mu.Lock()
	stale := digest != n.advertised
	if stale {
		n.advertised = digest
	}
	n.mu.Unlock()
	if stale {
		if err := n.ml.UpdateNode(time.Second); err != nil {
			n.log.Debug("digest update not yet gossiped", "error", err)
		}
	}
	n.updateLeader()
	if n.foreignDisc.Swap(false) && n.Leader() {
		n.reassert()
	}
}

// reassert rewrites this leader's discovered state where merges replaced it.
func (n *Node) reassert() {
	n.ownedMu.Lock()
	owned := maps.Clone(n.owned)
	gws := maps.Clone(n.ownedGW)
	n.ownedMu.Unlock()
	for src, c := range owned {
		if n.discoveredDiffers(src, c) {
			n.log.Info("discovered entries written elsewhere replaced by this leader's", "source", src)
			n.SetDiscovered(src, c)
		}
	}
	for _, g := range gws {
		_ = n.SetGateway(g)
	}
}

func (n *Node) discoveredDiffers(source string, c *catalog.Catalog) bool {
	if _, ok := n.store.Get(readyKey(source)); !ok {
		return true
	}
	live := n.store.Live(discoveredPrefix(source))
	if len(live) != len(c.Services) {
		return true
	}
	want := map[string][]byte{}
	for _, s := range c.Services {
		v, err := n.store.validate(DiscoveredKey(source, s.Host), mustJSON(s))
		if err != nil {
			continue
		}
		want[DiscoveredKey(source, s.Host)] = v
	}
	for _, e := range live {
		if string(want[e.Key]) != string(e.Value) {
			return true
		}
	}
	return false
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func (n *Node) poke() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// Leader reports whether this peer runs discovery: the live member with the lowest name. Every
// peer computes the same answer from the same membership, without an election round; when the
// leader fails, the next-lowest takes over once failure detection declares it dead.
func (n *Node) Leader() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.leader
}

// LeaderChanges delivers the latest leadership state whenever it changes (the first value
// arrives soon after Start).
func (n *Node) LeaderChanges() <-chan bool { return n.leaderCh }

func (n *Node) leaderName() string {
	name := n.cfg.Name
	for _, m := range n.memberList() {
		if m.Name < name {
			name = m.Name
		}
	}
	return name
}

// memberList is a copy of the live members, sorted by name.
func (n *Node) memberList() []memberlist.Node {
	n.tableMu.Lock()
	out := make([]memberlist.Node, 0, len(n.table))
	for _, m := range n.table {
		out = append(out, m)
	}
	n.tableMu.Unlock()
	slices.SortFunc(out, func(a, b memberlist.Node) int { return cmpString(a.Name, b.Name) })
	return out
}

func (n *Node) updateLeader() {
	// A peer that does not hold the fleet's state yet does not lead: its discovery would add a
	// watcher and write over the fleet's entries with a view nobody serves (it is not ready).
	if !n.joinTried.Load() || !n.synced.Load() {
		return
	}
	lead := n.leaderName() == n.cfg.Name
	n.mu.Lock()
	changed := lead != n.leader || !n.leaderKnown
	n.leader, n.leaderKnown = lead, true
	n.mu.Unlock()
	if changed {
		select { // keep only the latest value
		case <-n.leaderCh:
		default:
		}
		n.leaderCh <- lead
		if lead {
			n.log.Info("this peer now runs discovery for the fleet")
		}
	}
}

// Members lists the members, with the digest each advertises: alive and suspect ones, then
// those that recently failed (dead) or left.
func (n *Node) Members() []Member {
	leader := n.leaderName()
	var out []Member
	n.tableMu.Lock()
	suspect := maps.Clone(n.suspect)
	n.tableMu.Unlock()
	for _, m := range n.memberList() {
		mm := Member{Name: m.Name, Addr: m.Address(), State: StateAlive, Digest: metaDigest(m.Meta), Leader: m.Name == leader}
		if since, ok := suspect[m.Name]; ok {
			mm.State, mm.Since = StateSuspect, since
		}
		out = append(out, mm)
	}
	for _, g := range n.goneMembers(time.Now()) {
		out = append(out, Member{Name: g.node.Name, Addr: g.node.Address(), State: g.state, Digest: metaDigest(g.node.Meta), Since: g.since})
	}
	return out
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Digest is the hash of this peer's store contents, and the number of live entries.
func (n *Node) Digest() (string, int) { return n.store.Digest() }

// Converged reports whether this peer holds the fleet's state and every member it reaches
// advertises this peer's digest. A peer that reaches none of the peers it expects is not
// converged: it cannot know what the others hold.
func (n *Node) Converged() bool { return n.Health().Converged }

// HealthScore is memberlist's awareness score: 0 is healthy, higher means this peer is slow to
// answer probes (overloaded or losing packets).
func (n *Node) HealthScore() int { return n.ml.GetHealthScore() }

type nodeMeta struct {
	Digest  string `json:"d"`
	Leaving bool   `json:"l,omitempty"`
}

func metaLeaving(b []byte) bool {
	var m nodeMeta
	return json.Unmarshal(b, &m) == nil && m.Leaving
}

func metaDigest(b []byte) string {
	var m nodeMeta
	if json.Unmarshal(b, &m) != nil {
		return ""
	}
	return m.Digest
}

// --- writes ------------------------------------------------------------------------------------

// put writes locally and sends the change.
func (n *Node) put(key string, value []byte) (bool, error) {
	e, changed, err := n.store.Put(key, value)
	if err != nil || !changed {
		return false, err
	}
	n.send([]Entry{e}, true)
	return true, nil
}

func (n *Node) del(key string) bool {
	e, ok := n.store.Delete(key)
	if ok {
		n.send([]Entry{e}, true)
	}
	return ok
}

// send spreads changed entries: small ones as gossip broadcasts (each peer that learns something
// new passes it on), large ones by a reliable send to every member from the writer only.
func (n *Node) send(entries []Entry, local bool) {
	var big []Entry
	for _, e := range entries {
		msg := encodeMessage(msgDelta, []Entry{e})
		if len(msg) <= n.maxCast {
			n.queue.QueueBroadcast(&broadcast{key: e.Key, msg: msg})
			continue
		}
		big = append(big, e)
	}
	if len(big) > 0 && local {
		members := n.memberList()
		go func() {
			for _, e := range big {
				msg := encodeMessage(msgDelta, []Entry{e})
				for _, m := range members {
					if m.Name == n.cfg.Name {
						continue
					}
					if err := n.ml.SendReliable(&m, msg); err != nil {
						n.log.Debug("large entry not sent; anti-entropy will carry it", "key", e.Key, "peer", m.Name, "error", err)
					}
				}
			}
		}()
	}
	n.poke()
}

// Apply upserts operator entries. Every service is checked with the catalog's rules, alone and
// together with the operator entries already in the store; nothing is written if any fails.
func (n *Node) Apply(services []catalog.Service) (changed int, err error) {
	current := map[string]catalog.Service{}
	for _, s := range n.OperatorServices() {
		current[s.Host] = s
	}
	next := &catalog.Catalog{Services: slices.Clone(services)}
	next.Normalize()
	for _, s := range next.Services {
		current[s.Host] = s
	}
	all := &catalog.Catalog{}
	for _, s := range current {
		all.Services = append(all.Services, s)
	}
	all.Normalize()
	if err := all.Validate(n.cfg.CatalogOptions); err != nil {
		return 0, fmt.Errorf("operator entries would conflict: %w", err)
	}
	for _, s := range next.Services {
		v, err := json.Marshal(s)
		if err != nil {
			return changed, err
		}
		ok, err := n.put(OperatorKey(s.Host), v)
		if err != nil {
			return changed, err
		}
		if ok {
			changed++
		}
	}
	return changed, nil
}

// Delete removes operator entries by host; it returns the hosts that existed.
func (n *Node) Delete(hosts []string) []string {
	var gone []string
	for _, h := range hosts {
		if n.del(OperatorKey(h)) {
			gone = append(gone, h)
		}
	}
	return gone
}

// OperatorServices are the operator entries, sorted by host.
func (n *Node) OperatorServices() []catalog.Service {
	return servicesOf(n.store.Live(prefixOperator)).Services
}

// SetDiscovered replaces what a discovery source found (the leader calls it): changed services
// are written, services no longer found are deleted, unchanged ones cause no traffic.
func (n *Node) SetDiscovered(source string, c *catalog.Catalog) {
	n.ownedMu.Lock()
	n.owned[source] = c
	n.ownedMu.Unlock()
	prefix := discoveredPrefix(source)
	stale := map[string]bool{}
	for _, e := range n.store.Live(prefix) {
		stale[e.Key] = true
	}
	for _, s := range c.Services {
		key := DiscoveredKey(source, s.Host)
		delete(stale, key)
		v, err := json.Marshal(s)
		if err == nil {
			_, err = n.put(key, v)
		}
		if err != nil {
			n.log.Error("discovered service not shared with the fleet", "source", source, "host", s.Host, "error", err)
		}
	}
	for k := range stale {
		n.del(k)
	}
	if _, err := n.put(readyKey(source), emptyObject); err != nil {
		n.log.Error("cannot mark source reported", "source", source, "error", err)
	}
}

// --- memberlist delegates ----------------------------------------------------------------------

type broadcast struct {
	key string
	msg []byte
}

func (b *broadcast) Invalidates(o memberlist.Broadcast) bool {
	ob, ok := o.(*broadcast)
	return ok && ob.key == b.key
}
func (b *broadcast) Name() string    { return b.key }
func (b *broadcast) Message() []byte { return b.msg }
func (b *broadcast) Finished()       {}

// delegate implements memberlist.Delegate: metadata, user messages and push/pull state.
type delegate Node

// NodeMeta is this peer's digest, carried in every alive message.
func (d *delegate) NodeMeta(limit int) []byte {
	n := (*Node)(d)
	n.mu.Lock()
	digest := n.advertised
	n.mu.Unlock()
	b, _ := json.Marshal(nodeMeta{Digest: digest, Leaving: n.leaving.Load()})
	return b
}

// NotifyMsg receives a delta (broadcast or reliable send). It must not block for long: it runs on
// memberlist's packet loop.
func (d *delegate) NotifyMsg(b []byte) {
	n := (*Node)(d)
	typ, entries, err := DecodeMessage(b, MaxDeltaBytes)
	if err == nil && typ != msgDelta {
		err = fmt.Errorf("%w: state message sent as a delta", ErrMalformed)
	}
	if err != nil {
		n.reject(err, "")
		return
	}
	changed := n.merge(entries, "")
	if len(changed) > 0 {
		n.send(changed, false)
	}
}

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return (*Node)(d).queue.GetBroadcasts(overhead, limit)
}

// LocalState is the whole store for push/pull and join.
func (d *delegate) LocalState(join bool) []byte {
	n := (*Node)(d)
	msg := encodeMessage(msgState, n.store.All())
	if len(msg) > MaxStateBytes {
		n.log.Error("fleet configuration too large to replicate; peers will not receive it", "bytes", len(msg), "limit", MaxStateBytes)
		return encodeMessage(msgState, nil)
	}
	n.metrics.stateBytes.Observe(float64(len(msg)))
	return msg
}

// MergeRemoteState merges a peer's whole store.
func (d *delegate) MergeRemoteState(b []byte, join bool) {
	n := (*Node)(d)
	if len(b) == 0 {
		return // peer without a delegate state (should not happen within the fleet)
	}
	typ, entries, err := DecodeMessage(b, MaxStateBytes)
	if err == nil && typ != msgState {
		err = fmt.Errorf("%w: delta sent as state", ErrMalformed)
	}
	if err != nil {
		n.reject(err, "push/pull")
		return
	}
	if !n.synced.Load() {
		n.log.Info("holding the fleet's state", "entries", len(entries), "join", join)
	}
	if changed := n.merge(entries, "push/pull"); len(changed) > 0 {
		n.log.Debug("anti-entropy brought changes", "entries", len(changed), "join", join)
	}
	n.setSynced()
}

func (n *Node) merge(entries []Entry, via string) []Entry {
	changed, rejected := n.store.Merge(entries)
	for _, err := range rejected {
		n.reject(err, via)
	}
	for _, e := range changed {
		if !strings.HasPrefix(e.Key, prefixOperator) {
			n.foreignDisc.Store(true)
			break
		}
	}
	if len(changed) > 0 {
		n.poke()
	}
	return changed
}

func (n *Node) reject(err error, via string) {
	reason := "invalid_entry"
	switch {
	case errors.Is(err, ErrOversized):
		reason = "oversized"
	case errors.Is(err, ErrVersion):
		reason = "version"
	case errors.Is(err, ErrMalformed):
		reason = "malformed"
	case errors.Is(err, ErrClockSkew):
		reason = "clock_skew"
	}
	n.metrics.rejected.WithLabelValues(reason).Inc()
	if ok, left := n.logLimit.Allow(reason); ok {
		n.log.Warn("gossip message rejected; not applied", "reason", reason, "via", via, "error", err, "not_logged_since_last", left)
	}
}

// events implements memberlist.EventDelegate: it keeps the member table (memberlist calls it with
// its node lock held, so the node is copied here) and recomputes leadership.
type events Node

func (e *events) record(m *memberlist.Node) {
	c := *m
	c.Meta = slices.Clone(m.Meta)
	c.Addr = slices.Clone(m.Addr)
	e.tableMu.Lock()
	e.table[c.Name] = c
	delete(e.lost, c.Address())
	delete(e.gone, c.Name)
	e.tableMu.Unlock()
}

func (e *events) NotifyJoin(m *memberlist.Node) {
	e.record(m)
	n := (*Node)(e)
	if m.Name != n.cfg.Name {
		n.log.Info("peer joined", "peer", m.Name, "addr", m.Address())
	}
	n.poke()
}

func (e *events) NotifyLeave(m *memberlist.Node) {
	e.tableMu.Lock()
	last, ok := e.table[m.Name]
	state := StateDead
	if metaLeaving(m.Meta) || ok && metaLeaving(last.Meta) {
		state = StateLeft
	}
	c := *m
	c.Meta, c.Addr = slices.Clone(m.Meta), slices.Clone(m.Addr)
	e.gone[m.Name] = gone{node: c, state: state, since: time.Now()}
	delete(e.suspect, m.Name)
	delete(e.table, m.Name)
	// A failed member is retried with the seeds (a partition heals even without a seed on the
	// other side); one that announced its departure is not.
	if state == StateDead {
		e.lost[m.Address()] = time.Now()
	}
	e.tableMu.Unlock()
	n := (*Node)(e)
	if state == StateLeft {
		n.log.Info("peer left", "peer", m.Name, "addr", m.Address())
	} else {
		select {
		case n.rejoin <- struct{}{}:
		default:
		}
		n.log.Warn("peer failed: declared dead by the fleet (crashed, or unreachable from here)", "peer", m.Name, "addr", m.Address())
	}
	n.poke()
}

func (e *events) NotifyUpdate(m *memberlist.Node) {
	e.record(m)
	(*Node)(e).poke()
}

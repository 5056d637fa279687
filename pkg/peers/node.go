// Package peers keeps the fleet's configuration identical on every instance: membership and
// failure detection by gossip (hashicorp/memberlist, SWIM), and a replicated last-writer-wins
// store of catalog entries. Changes spread as broadcasts piggybacked on gossip; the full state is
// exchanged by periodic push/pull (anti-entropy) and on join, so a new or returning peer receives
// everything. Each peer advertises a digest of its store in its member metadata, which makes
// convergence visible from any peer.
package peers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
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
	// burst: since its last state exchange started, this peer wrote more entries at once than
	// go direct. exchanges counts the exchanges started (boundQueue).
	burst     atomic.Bool
	exchanges atomic.Int64
	// joinTried is set after the first attempt to join the seeds: until then a peer does not
	// lead, so a starting instance does not briefly run discovery alone.
	joinTried atomic.Bool

	// state is the last push/pull state message and the store generation it encodes: sent again
	// until the store changes, and a peer's state equal to it is already held (delegate.go).
	stateMu  sync.Mutex
	state    []byte
	stateGen uint64
}

// lostRetention is how long a failed member's address is retried.
const lostRetention = time.Hour

// maxQueued bounds the broadcast queue.
const maxQueued = 4096

// maxDirectEntries: this many entries of a local write are also sent straight to every member;
// the rest of a larger write (a burst) is left to gossip and a state exchange.
const maxDirectEntries = 64

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
	// memberlist's LZW compression cost more CPU than anything else in a push/pull of a
	// 10,000-service store (3 MB of JSON compressed by the sender, decompressed by the
	// receiver, both ways, every interval), for bandwidth a LAN does not miss. Receivers still
	// accept compressed messages, so members with and without it interoperate.
	mc.EnableCompression = false
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
			n.boundQueue(ctx)
		case <-gc.C:
			if k := n.store.GC(); k > 0 {
				n.log.Debug("forgot expired deletes", "count", k)
			}
		}
	}
}

// boundQueue keeps the broadcast queue within maxQueued, and after a burst of this peer's own
// writes (more entries at once than go direct: a first discovery of thousands of services)
// exchanges the whole store with every member at once, rather than leave the rest of the burst
// to gossip rounds. A queue kept full by relays, or by the single changes that follow a burst,
// is only pruned: an exchange with every member for each of those cost the leader of 32
// instances half a second of CPU per change, and each member a state to decode.
func (n *Node) boundQueue(ctx context.Context) {
	if n.queue.NumQueued() > maxQueued {
		n.queue.Prune(maxQueued)
	}
	if n.burst.Load() && n.exchangeState(ctx) {
		n.burst.Store(false)
	}
}

// exchangeState pushes and pulls the whole store with every member now (memberlist's Join does
// exactly that exchange), once per interval at most: after a burst too large for broadcasts,
// the members get it at once instead of at their next periodic push/pull (30s on a LAN). It
// reports whether it started.
func (n *Node) exchangeState(ctx context.Context) bool {
	now := time.Now()
	n.mu.Lock()
	if now.Sub(n.lastExchange) < 5*time.Second {
		n.mu.Unlock()
		return false
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
		return true // no one to tell
	}
	n.exchanges.Add(1)
	go func() {
		if ctx.Err() != nil {
			return
		}
		if k, err := n.ml.Join(addrs); err != nil {
			n.log.Debug("state exchange after a large change incomplete; periodic push/pull will finish it", "reached", k, "error", err)
		}
	}()
	return true
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

func (n *Node) poke() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
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

package peers

import (
	"encoding/json"
	"maps"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

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

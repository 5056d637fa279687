package peers

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

// Member states as fwdproxy status and the metrics show them.
const (
	StateAlive   = "alive"
	StateSuspect = "suspect" // this peer's probes of it failed; memberlist's suspicion timer runs
	StateDead    = "dead"    // declared failed by the fleet (crash, or unreachable: a partition)
	StateLeft    = "left"    // left gracefully (shutdown hooks, scale-in)
)

// goneRetention is how long a failed member is listed as dead, and a departed one as left.
const (
	deadRetention = lostRetention
	leftRetention = 10 * time.Minute
)

// gone is a member that failed or left, as last seen.
type gone struct {
	node  memberlist.Node
	state string
	since time.Time
}

// Health summarizes this peer's view of the fleet for an operator: what fwdproxy status prints
// and the fwdproxy_gossip_* gauges export.
type Health struct {
	// Synced is true once this peer holds the fleet's full state: a join exchanged the whole
	// store with a peer, or there was no other peer to contact (the first instance of a fleet).
	Synced bool `json:"synced"`
	// Isolated: this peer expects peers (seeds, discovery or former members) but reaches none.
	Isolated bool `json:"isolated,omitempty"`
	// PartitionSuspected: members failed (not left) and this peer sees no more than half of the
	// fleet it knew; from this side a partition and a crash of most of the fleet look alike.
	PartitionSuspected bool `json:"partitionSuspected,omitempty"`
	Alive              int  `json:"alive"`
	Suspect            int  `json:"suspect,omitempty"`
	Dead               int  `json:"dead,omitempty"`
	Left               int  `json:"left,omitempty"`
	// Converged: synced, not isolated, and every alive member advertises this peer's digest.
	Converged bool `json:"converged"`
	// Problems say why the fleet is not healthy from here, one line each (empty when healthy).
	Problems []string `json:"problems,omitempty"`
}

// Health is this peer's view of the fleet now.
func (n *Node) Health() Health {
	h := Health{Synced: n.synced.Load()}
	digest, _ := n.store.Digest()
	differ := 0
	for _, m := range n.Members() {
		switch m.State {
		case StateAlive:
			h.Alive++
		case StateSuspect:
			h.Suspect++
			h.Problems = append(h.Problems, fmt.Sprintf("member %s is suspect: probes from here fail", m.Name))
		case StateDead:
			h.Dead++
			h.Problems = append(h.Problems, fmt.Sprintf("member %s (%s) is dead since %s", m.Name, m.Addr, m.Since.UTC().Format(time.RFC3339)))
		case StateLeft:
			h.Left++
		}
		if (m.State == StateAlive || m.State == StateSuspect) && m.Digest != digest {
			differ++
		}
	}
	live := h.Alive + h.Suspect
	h.Isolated = live <= 1 && n.expectsPeers()
	h.PartitionSuspected = h.Dead > 0 && live*2 <= live+h.Dead
	switch {
	case !h.Synced:
		h.Problems = append(h.Problems, "not synced: no peer reached yet, so this peer may not hold the fleet's full state (check peers.seeds, the gossip port and that peers.keyring matches the fleet's)")
	case h.Isolated:
		h.Problems = append(h.Problems, "isolated: no peer reachable, a partition or every peer failed; serving the last configuration it holds (check the gossip port between instances and peers.keyring)")
	}
	if h.PartitionSuspected && !h.Isolated {
		h.Problems = append(h.Problems, fmt.Sprintf("partition suspected: %d of %d known members unreachable", h.Dead, live+h.Dead))
	}
	if differ > 0 {
		h.Problems = append(h.Problems, fmt.Sprintf("not converged: %d member(s) advertise another digest", differ))
	}
	h.Converged = h.Synced && !h.Isolated && differ == 0
	return h
}

func (n *Node) setSynced() {
	n.syncedOnce.Do(func() {
		n.synced.Store(true)
		close(n.syncedCh)
		n.poke() // leadership may start now
	})
}

// Synced is closed once this peer holds the fleet's full state.
func (n *Node) Synced() <-chan struct{} { return n.syncedCh }

// expectsPeers reports whether this peer should see others: its last join attempt found seeds or
// discovered peers to contact and none answered, or members it saw fail. (A fleet scaled in to
// one instance, whose peer discovery finds only itself, expects none.)
func (n *Node) expectsPeers() bool {
	if n.unreached.Load() {
		return true
	}
	n.tableMu.Lock()
	defer n.tableMu.Unlock()
	for _, g := range n.gone {
		if g.state == StateDead {
			return true
		}
	}
	return false
}

// markSuspect records that this peer's own probe of name failed (memberlist logs it, and offers
// no event for it); a later ack or membership event clears it.
func (n *Node) markSuspect(name string) {
	n.tableMu.Lock()
	if _, ok := n.table[name]; ok {
		n.suspect[name] = time.Now()
	}
	n.tableMu.Unlock()
}

func (n *Node) clearSuspect(name string) {
	n.tableMu.Lock()
	delete(n.suspect, name)
	n.tableMu.Unlock()
}

// suspectFromLog extracts the member name from memberlist's "Suspect NAME has failed" line.
func suspectFromLog(line string) (string, bool) {
	rest, ok := strings.CutPrefix(line, "Suspect ")
	if !ok {
		return "", false
	}
	name, _, ok := strings.Cut(rest, " has failed")
	return name, ok
}

// goneMembers lists the failed and departed members still retained, sorted by name.
func (n *Node) goneMembers(now time.Time) []gone {
	n.tableMu.Lock()
	defer n.tableMu.Unlock()
	var out []gone
	for name, g := range n.gone {
		keep := deadRetention
		if g.state == StateLeft {
			keep = leftRetention
		}
		if now.Sub(g.since) > keep {
			delete(n.gone, name)
			continue
		}
		out = append(out, g)
	}
	slices.SortFunc(out, func(a, b gone) int { return cmpString(a.node.Name, b.node.Name) })
	return out
}

// pings implements memberlist.PingDelegate: an ack from a member clears its suspicion here.
type pings Node

func (p *pings) AckPayload() []byte { return nil }
func (p *pings) NotifyPingComplete(other *memberlist.Node, _ time.Duration, _ []byte) {
	(*Node)(p).clearSuspect(other.Name)
}

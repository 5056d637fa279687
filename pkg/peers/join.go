package peers

import (
	"context"
	"slices"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/backoff"
)

// Join contacts the given peers now; it returns how many answered.
func (n *Node) Join(addrs []string) (int, error) { return n.ml.Join(addrs) }

// joinLoop joins the seeds at start, retrying with backoff until one answers, then checks every
// RejoinInterval for seeds that are not members (a healed partition, a restarted fleet).
func (n *Node) joinLoop(ctx context.Context) {
	// Back off 1s, 2s, 4s ... 30s, with jitter, until a seed answers.
	bo := backoff.New(backoff.Spread(time.Second, 30*time.Second))
	joined := false
	for {
		ok := n.joinSeeds(ctx, joined)
		if !n.joinTried.Swap(true) {
			n.poke()
		}
		wait := n.cfg.RejoinInterval
		if ok {
			joined = true
			bo.Reset()
		} else {
			wait = bo.Next()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		case <-n.rejoin:
			bo.Reset() // a member just failed: retry now, then back off from 1s if nobody answers
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

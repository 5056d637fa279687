package peers

import (
	"encoding/json"
	"fmt"
	"slices"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// put writes one entry locally and sends it.
func (n *Node) put(key string, value []byte) (bool, error) {
	e, changed, err := n.store.Put(key, value)
	if err != nil || !changed {
		return false, err
	}
	n.send([]Entry{e}, true)
	return true, nil
}

// send spreads one write's changed entries: small ones as gossip broadcasts (each peer that learns
// something new passes it on), large ones by a reliable send to every member from the writer only.
func (n *Node) send(entries []Entry, local bool) {
	if len(entries) == 0 {
		return
	}
	// A local write also goes straight to every member, one packet per entry, up to
	// maxDirectEntries of it: an operator's change or a watch event then reaches the fleet in one
	// hop instead of several gossip rounds (200ms each on a LAN); the broadcast still carries it
	// to a member whose packet was lost. The rest of a larger write (a burst: a first discovery)
	// is left to gossip and to a state exchange with every member (boundQueue). Each write gets
	// its own allowance, whatever the queue holds: after a burst the queue stays long for
	// minutes, and a change that waited behind it took seconds to reach the fleet.
	if local && len(entries) > maxDirectEntries {
		n.burst.Store(true)
	}
	var big []Entry
	var direct [][]byte
	for _, e := range entries {
		msg := encodeMessage(msgDelta, []Entry{e})
		if len(msg) <= n.maxCast {
			n.queue.QueueBroadcast(&broadcast{key: e.Key, msg: msg})
			if local && len(direct) < maxDirectEntries {
				direct = append(direct, msg)
			}
			continue
		}
		big = append(big, e)
	}
	if len(direct) > 0 {
		for _, m := range n.memberList() {
			if m.Name == n.cfg.Name {
				continue
			}
			for _, msg := range direct {
				if err := n.ml.SendBestEffort(&m, msg); err != nil {
					n.log.Debug("change not sent directly; gossip will carry it", "peer", m.Name, "error", err)
				}
			}
		}
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
	var written []Entry
	defer func() { n.send(written, true) }() // what was written is sent, even after an error
	for _, s := range next.Services {
		v, err := json.Marshal(s)
		if err != nil {
			return len(written), err
		}
		e, ok, err := n.store.Put(OperatorKey(s.Host), v)
		if err != nil {
			return len(written), err
		}
		if ok {
			written = append(written, e)
		}
	}
	return len(written), nil
}

// Delete removes operator entries by host; it returns the hosts that existed.
func (n *Node) Delete(hosts []string) []string {
	var gone []string
	var written []Entry
	for _, h := range hosts {
		if e, ok := n.store.Delete(OperatorKey(h)); ok {
			gone, written = append(gone, h), append(written, e)
		}
	}
	n.send(written, true)
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
	var written []Entry
	for _, s := range c.Services {
		key := DiscoveredKey(source, s.Host)
		delete(stale, key)
		v, err := json.Marshal(s)
		var e Entry
		var ok bool
		if err == nil {
			e, ok, err = n.store.Put(key, v)
		}
		if err != nil {
			n.log.Error("discovered service not shared with the fleet", "source", source, "host", s.Host, "error", err)
		}
		if ok {
			written = append(written, e)
		}
	}
	for k := range stale {
		if e, ok := n.store.Delete(k); ok {
			written = append(written, e)
		}
	}
	if e, ok, err := n.store.Put(readyKey(source), emptyObject); err != nil {
		n.log.Error("cannot mark source reported", "source", source, "error", err)
	} else if ok {
		written = append(written, e)
	}
	n.send(written, true)
}

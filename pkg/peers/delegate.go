package peers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/memberlist"
)

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

// LocalState is the whole store for push/pull and join. The message is made again only after the
// store changed, from the entries' kept encodings: at 10,000 entries it is megabytes of JSON, and
// every member exchanges it with another every push/pull interval.
func (d *delegate) LocalState(join bool) []byte {
	n := (*Node)(d)
	gen := n.store.Generation("") // read before the entries: a change in between re-encodes next time
	n.stateMu.Lock()
	msg := n.state
	if msg == nil || n.stateGen != gen {
		msg = n.store.State()
		n.state, n.stateGen = msg, gen
	}
	n.stateMu.Unlock()
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
	// A converged peer sends the very bytes this peer last sent: everything in them is held
	// already (merging its own earlier state changes no store), so decoding them is skipped.
	n.stateMu.Lock()
	same := n.state != nil && bytes.Equal(b, n.state)
	n.stateMu.Unlock()
	if same {
		n.setSynced()
		return
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

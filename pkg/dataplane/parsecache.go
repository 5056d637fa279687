package dataplane

import (
	"sync/atomic"

	"google.golang.org/protobuf/proto"
)

// parseCache keeps the parsed form of each listener or cluster, so that a delta response costs
// what it changed: listeners and clusters are applied as the whole set they make with what was
// accepted before (a listener's address must be unique among all of them), but a resource whose
// name and version (or, without a version, whose decoded message) is the one parsed before is
// not parsed again. Parsing is free of side effects (resources.go), so a parse kept from a
// response that was rejected as a whole is as good as a new one. Owned by the xDS goroutine.
type parseCache[T any] struct {
	entries map[string]parsedEntry[T]
	// parses counts resources parsed (not taken from the cache): tests read it.
	parses atomic.Int64
}

type parsedEntry[T any] struct {
	version string
	msg     proto.Message
	cfg     T
}

// get is the parsed form of the resource name at version r, parsing it only when it changed.
// A resource that fails to parse is not kept: it is parsed (and rejected) again if resent.
func (pc *parseCache[T]) get(name string, r acceptedResource, parse func() (T, error)) (T, error) {
	if e, ok := pc.entries[name]; ok && (e.msg == r.msg || (r.version != "" && e.version == r.version)) {
		return e.cfg, nil
	}
	pc.parses.Add(1)
	cfg, err := parse()
	if err != nil {
		return cfg, err
	}
	if pc.entries == nil {
		pc.entries = map[string]parsedEntry[T]{}
	}
	pc.entries[name] = parsedEntry[T]{version: r.version, msg: r.msg, cfg: cfg}
	return cfg, nil
}

// keepOnly forgets the entries of resources no longer in the accepted set, once it is smaller.
func (pc *parseCache[T]) keepOnly(accepted map[string]acceptedResource) {
	if len(pc.entries) <= len(accepted) {
		return
	}
	for name := range pc.entries {
		if _, ok := accepted[name]; !ok {
			delete(pc.entries, name)
		}
	}
}

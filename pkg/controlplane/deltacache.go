package controlplane

import (
	"cmp"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// deltaCache answers delta xDS watches at a cost proportional to what changed. go-control-plane's
// SnapshotCache, on every snapshot and for every delta watch, walks every resource of the type
// and builds a new version map of all of them (and again when the ACK opens the next watch), so
// a one-service change at 10,000 services costs 20,000 map entries per stream and type. Here
// each Set records which names changed per type (the Builder's list, see Snapshot.changed; a
// change log of the last deltaLogLength sets), and a stream's watch looks only at the names
// changed since the set its state reflects.
//
// The stream's state is the go-control-plane server's Subscription: its returned-resources map
// (what the client holds, name -> version) is updated in place and handed back as the
// response's next version map, and it carries under deltaSeqKey the set it is up to date with.
// A stream without it (a new stream, or a reconnect with initial_resource_versions), one whose
// set fell out of the log, or one that toggled its wildcard subscription gets a full diff, as
// the SnapshotCache computes it. The server owns the Subscription; it is touched only in
// CreateDeltaWatch (on the stream's goroutine) or, while the watch is open, in set under mu.
//
// State of the world keeps the SnapshotCache (Server.cache), which sends whole types anyway.
type deltaCache struct {
	mu      sync.Mutex
	snap    *Served
	seq     int64
	log     []deltaChange // oldest first, at most deltaLogLength
	watches map[int64]*deltaWatch
	nextID  int64
}

// deltaLogLength bounds the change log: a stream more sets behind than this gets a full diff.
const deltaLogLength = 64

// deltaSeqKey is the entry of a stream's returned-resources map that names the set the rest of
// the map is up to date with. The map is only read by this cache (the server forwards it), and
// no xDS resource is named with a NUL byte.
const deltaSeqKey = "\x00fwdproxy-set"

// deltaChange is one set's changed names per type URL: new, changed or gone. A type whose
// names mostly changed is marked full instead (listing them would keep a catalog per set).
type deltaChange struct {
	seq   int64
	names map[string][]string
	full  map[string]bool
}

type deltaWatch struct {
	req *cache.DeltaRequest
	sub cache.Subscription
	ch  chan cache.DeltaResponse
}

func newDeltaCache() *deltaCache {
	return &deltaCache{watches: map[int64]*deltaWatch{}}
}

// deltaTypes are the types served, as type URLs.
var deltaTypes = []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType, resource.SecretType}

// set serves snap from now on and answers the open watches it changes; each watch looks at the
// changed names only. Those are the Builder's (changed, against base) when base is the snapshot
// served until now; otherwise the served types are compared, once per set (a type the Builder
// left unchanged is the same object and is skipped).
func (d *deltaCache) set(snap, base *Served, changed map[string][]string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ch := deltaChange{names: map[string][]string{}, full: map[string]bool{}}
	for _, typ := range deltaTypes {
		prev, next := d.snap.typ(typ), snap.typ(typ)
		if prev == next || prev.len() == 0 && next.len() == 0 {
			continue
		}
		names, known := changed[typ]
		if !known || base == nil || base != d.snap {
			names = changedNames(prev, next)
		}
		if 4*len(names) > next.len()+prev.len() {
			ch.full[typ] = true
		} else if len(names) > 0 {
			ch.names[typ] = names
		}
	}
	d.seq++
	ch.seq = d.seq
	d.snap = snap
	d.log = append(d.log, ch)
	if len(d.log) > deltaLogLength {
		d.log = append(d.log[:0], d.log[len(d.log)-deltaLogLength:]...)
	}
	// In ADS order (clusters, endpoints, listeners, routes, secrets), as the SnapshotCache
	// answers: a stream's responses share one channel, and Envoy should see a cluster before
	// its endpoints and a listener before its routes.
	ids := slices.SortedFunc(maps.Keys(d.watches), func(a, b int64) int {
		ta, tb := cache.GetResponseType(d.watches[a].req.GetTypeUrl()), cache.GetResponseType(d.watches[b].req.GetTypeUrl())
		return cmp.Or(cmp.Compare(ta, tb), cmp.Compare(a, b))
	})
	for _, id := range ids {
		if w := d.watches[id]; d.respond(w.req, w.sub, w.ch) {
			delete(d.watches, id)
		}
	}
	return nil
}

// changedNames lists the names new, changed or gone from prev to next (either may be nil).
func changedNames(prev, next *servedType) []string {
	var names []string
	i, j := 0, 0
	for i < next.len() || j < prev.len() {
		switch {
		case i == next.len():
			names = append(names, cache.GetResourceName(prev.items[j]))
			j++
		case j == prev.len():
			names = append(names, cache.GetResourceName(next.items[i]))
			i++
		default:
			a, b := cache.GetResourceName(next.items[i]), cache.GetResourceName(prev.items[j])
			switch strings.Compare(a, b) {
			case -1:
				names = append(names, a)
				i++
			case 1:
				names = append(names, b)
				j++
			default:
				if next.vers[i] != prev.vers[j] {
					names = append(names, a)
				}
				i, j = i+1, j+1
			}
		}
	}
	return names
}

// CreateDeltaWatch answers at once if the stream lacks something, else opens a watch.
func (d *deltaCache) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	// A client's initial_resource_versions are what it holds, never this cache's bookkeeping.
	delete(req.GetInitialResourceVersions(), deltaSeqKey)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.snap != nil && d.respond(req, sub, ch) {
		return nil, nil
	}
	d.nextID++
	id := d.nextID
	d.watches[id] = &deltaWatch{req: req, sub: sub, ch: ch}
	return func() {
		d.mu.Lock()
		delete(d.watches, id)
		d.mu.Unlock()
	}, nil
}

// respond brings sub up to the current snapshot for req's type and sends a response if the
// client lacks something (always for a wildcard stream's first request: Envoy waits for it).
// It says whether it sent one. d.mu is held. The channel has room: the server buffers one
// response per type and a watch sends at most once.
func (d *deltaCache) respond(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) bool {
	typ := req.GetTypeUrl()
	served := d.snap.typ(typ)
	returned := sub.ReturnedResources()
	wildcard := sub.IsWildcard()
	subscribed := sub.SubscribedResources()

	var names []string // the names to look at; nil with full for all of them
	full := true
	if since, err := strconv.ParseInt(returned[deltaSeqKey], 10, 64); err == nil && !togglesWildcard(req) {
		names, full = d.changedSince(typ, since)
		// Names the request (un)subscribed: the server has updated the subscription and,
		// for a name unsubscribed from a wildcard stream, marked it returned with version "".
		names = append(names, req.GetResourceNamesSubscribe()...)
		names = append(names, req.GetResourceNamesUnsubscribe()...)
	}
	if full {
		names = names[:0]
		if wildcard {
			for _, r := range served.itemsOrNil() {
				names = append(names, cache.GetResourceName(r))
			}
		}
		for name := range subscribed {
			names = append(names, name)
		}
		for name := range returned {
			if name != deltaSeqKey {
				names = append(names, name)
			}
		}
	}

	var send []*discovery.Resource
	var removed []string
	seen := make(map[string]bool, len(names))
	for _, name := range names {
		if seen[name] {
			continue
		}
		seen[name] = true
		_, wanted := subscribed[name]
		have, known := returned[name]
		if !wildcard && !wanted {
			delete(returned, name) // no longer subscribed: forget it, as the SnapshotCache does
			continue
		}
		r, rv, ok := served.lookup(name)
		var version string
		if ok {
			version = rv.String()
		}
		switch {
		case ok && (!known || have != version):
			b, err := cache.MarshalResource(r)
			if err != nil {
				continue // validated resources marshal; should one not, it is not marked sent
			}
			send = append(send, &discovery.Resource{Name: name, Version: version, Resource: &anypb.Any{TypeUrl: typ, Value: b}})
			returned[name] = version
		case !ok && known:
			removed = append(removed, name)
			delete(returned, name)
		}
	}
	returned[deltaSeqKey] = strconv.FormatInt(d.seq, 10)
	if len(send) == 0 && len(removed) == 0 && !(wildcard && req.GetResponseNonce() == "") {
		return false
	}
	ch <- &cache.DeltaPassthroughResponse{
		DeltaRequest:   req,
		NextVersionMap: returned,
		DeltaDiscoveryResponse: &discovery.DeltaDiscoveryResponse{
			TypeUrl:           typ,
			Resources:         send,
			RemovedResources:  removed,
			SystemVersionInfo: d.snap.GetVersion(typ),
		},
	}
	return true
}

// changedSince lists typ's names changed after set since, or says a full diff is needed.
func (d *deltaCache) changedSince(typ string, since int64) ([]string, bool) {
	if since > d.seq || (since < d.seq && (len(d.log) == 0 || d.log[0].seq > since+1)) {
		return nil, true // not this cache's set, or fallen out of the log
	}
	var names []string
	for _, c := range d.log {
		if c.seq <= since {
			continue
		}
		if c.full[typ] {
			return nil, true
		}
		names = append(names, c.names[typ]...)
	}
	return names, false
}

// togglesWildcard says whether req (un)subscribes "*": the set of names in scope changes whole.
func togglesWildcard(req *cache.DeltaRequest) bool {
	for _, l := range [][]string{req.GetResourceNamesSubscribe(), req.GetResourceNamesUnsubscribe()} {
		for _, n := range l {
			if n == "*" {
				return true
			}
		}
	}
	return false
}

var _ interface {
	CreateDeltaWatch(*cache.DeltaRequest, cache.Subscription, chan cache.DeltaResponse) (func(), error)
} = (*deltaCache)(nil)

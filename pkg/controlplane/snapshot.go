package controlplane

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/xdslimit"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// Secrets are the two SDS secrets Istio's agent serves, under the same names: "default" (the
// fleet's chain and key) and "ROOTCA" (the mesh's trust bundle).
func Secrets(b *identity.Bundle) []*tlsv3.Secret {
	return []*tlsv3.Secret{
		{Name: SecretCertificate, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inlineBytes(b.CertChainPEM),
			PrivateKey:       inlineBytes(b.KeyPEM),
		}}},
		{Name: SecretRoots, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inlineBytes(b.RootsPEM),
		}}},
	}
}

func inlineBytes(b []byte) *core.DataSource {
	return &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b}}
}

// Snapshot is a validated, versioned set of resources ready to serve.
type Snapshot struct {
	Cache *Served
	// ConfigVersion is the hash of listeners, routes, clusters and endpoints: identical on every
	// peer that has the same catalog and gateways. Secrets are versioned apart because each node
	// may hold its own key (e.g. issued on the node), and their version hashes only the public
	// certificates, never the key.
	ConfigVersion  string
	SecretsVersion string
	// base is the Builder's previous build this one was made from, and changed, per type URL,
	// the names whose version differs from base's (new, changed or gone); a type absent from
	// changed is not known this way (a full build). The delta cache uses them when base is the
	// snapshot it served last, so that a change costs it what changed.
	base    *Served
	changed map[string][]string
}

// NewSnapshot validates every resource (including the typed configs inside them) and the
// references between them, and versions each type by a hash of its content.
func NewSnapshot(res *Resources, bundle *identity.Bundle) (*Snapshot, error) {
	return (&Builder{}).Build(res, bundle)
}

// Builder builds snapshots and remembers its last build, so that a rebuild after a small catalog
// change costs what changed: a resource passed again (a Translator hands back the same object for
// an unchanged service) is neither marshaled nor validated again, and the snapshot's versions, its
// size limit and its references are updated for the changed resources only. Safe for one
// goroutine.
type Builder struct {
	// last is each type's state in the last good build (listeners, routes, clusters, endpoints).
	last map[resource.Type]*typeState
	// validated are the sums of contents validated before: a new object with the same content
	// (a service changed and changed back) is not validated again.
	validated map[[32]byte]struct{}
	// vhosts are the virtual hosts of the last build's route configurations, digested and
	// valid: a route configuration holds every service's virtual host on its port, and a change
	// to one service must not marshal and validate all of them again.
	vhosts map[*route.VirtualHost]digest
	// clusterSums are the last build's cluster sums, by the EDS name of their endpoints.
	clusterSums map[string][32]byte
	// refCount counts, per route or endpoint name, the listeners or clusters referencing it.
	refCount map[resource.Type]map[string]int
	// lastSnap is the last good build's snapshot (Snapshot.base of the next).
	lastSnap *Served
	// MaxMessageBytes is the largest xDS message a data plane takes; a snapshot with a response
	// larger than that is refused. Zero means xdslimit.MaxMessageBytes.
	MaxMessageBytes int
}

// typeState is one type's resources as served, with what was derived from each.
type typeState struct {
	items   []types.Resource
	digests []digest
	refs    [][]string // listeners and clusters: the routes or endpoints each references
	// served is the type as served: items with their delta versions and the type's version,
	// shared with the snapshot (never modified; an unchanged type shares the last build's).
	served *servedType
	size   int // bytes of the response carrying all of them
}

func (b *Builder) maxMessageBytes() int {
	if b.MaxMessageBytes > 0 {
		return b.MaxMessageBytes
	}
	return xdslimit.MaxMessageBytes
}

// A response adds to its resources' own bytes: per resource, the google.protobuf.Any (counted
// exactly in responseBytes) and, in a delta response, the Resource's name and version (a 64-hex
// hash) with their tags; per response, its version, type URL, nonce and control plane. These
// bound the latter two.
const (
	perResourceOverhead = 80
	perResponseOverhead = 4 << 10
)

func responseBytes(typ resource.Type, size int, name string) int {
	any := protowire.SizeTag(1) + protowire.SizeBytes(len(typ)) + protowire.SizeTag(2) + protowire.SizeBytes(size)
	return protowire.SizeTag(2) + protowire.SizeBytes(any) + len(name) + perResourceOverhead
}

// change is how one type's resources differ from the last build's.
type change struct {
	prev    *typeState
	items   []types.Resource
	digests []digest // of items; filled for the unchanged ones by diff, for the rest by digest
	same    []bool   // items[i] is the last build's object (its digest and references carry over)
	prevAt  []int    // the last build's index of items[i]'s name, or -1
	todo    []int    // indices in items to digest: new or changed
	gone    []int    // indices in prev.items whose name is no longer there
	full    bool     // no usable last build: everything is derived anew
	// unchanged: the very objects of the last build, in order. same, prevAt and digests are
	// then shared, read-only slices: nothing of the type is allocated again.
	unchanged bool
}

// diff compares items with the last build's by name (both sorted, as Resources are) and object.
// Unsorted or repeated names, or a change to most resources, give a full rebuild.
func diff(prev *typeState, items []types.Resource) *change {
	if prev != nil && len(items) > 0 && slices.Equal(items, prev.items) {
		same, prevAt := unchangedSlices(len(items))
		return &change{prev: prev, items: items, digests: prev.digests, same: same, prevAt: prevAt, unchanged: true}
	}
	c := &change{prev: prev, items: items, digests: make([]digest, len(items)), same: make([]bool, len(items)), prevAt: make([]int, len(items))}
	full := func() *change {
		c.full, c.todo, c.gone = true, c.todo[:0], nil
		for i := range items {
			c.same[i], c.prevAt[i] = false, -1
			c.todo = append(c.todo, i)
		}
		return c
	}
	if prev == nil {
		return full()
	}
	i, j := 0, 0
	for i < len(items) || j < len(prev.items) {
		var cmp int
		switch {
		case i == len(items):
			cmp = 1
		case j == len(prev.items):
			cmp = -1
		case items[i] == prev.items[j]:
			cmp = 0
		default:
			cmp = strings.Compare(cache.GetResourceName(items[i]), cache.GetResourceName(prev.items[j]))
		}
		// Items out of order show at a step that compares names (an object in its old place
		// needs no check): refuse them there.
		if cmp != 0 && i > 0 && i < len(items) && cmp < 0 && cache.GetResourceName(items[i-1]) >= cache.GetResourceName(items[i]) {
			return full() // not sorted by name
		}
		switch {
		case cmp < 0: // new name
			c.prevAt[i] = -1
			c.todo = append(c.todo, i)
			i++
		case cmp > 0: // name gone
			c.gone = append(c.gone, j)
			j++
		default:
			c.prevAt[i] = j
			if items[i] == prev.items[j] {
				c.same[i], c.digests[i] = true, prev.digests[j]
			} else {
				c.todo = append(c.todo, i)
			}
			i, j = i+1, j+1
		}
	}
	if 4*(len(c.todo)+len(c.gone)) > len(items)+len(prev.items) {
		return full()
	}
	return c
}

// unchangedSlices are a change's same and prevAt for an unchanged type of n items: all true,
// and 0, 1, 2, ... (each item at its own index in the last build). Read-only, and shared by the
// unchanged types of every build.
func unchangedSlices(n int) (same []bool, prevAt []int) {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if len(sharedTrue) < n {
		m := n + n/4
		sharedTrue, sharedInOrder = make([]bool, m), make([]int, m)
		for i := range m {
			sharedTrue[i], sharedInOrder[i] = true, i
		}
	}
	return sharedTrue[:n:n], sharedInOrder[:n:n]
}

var (
	sharedMu      sync.Mutex
	sharedTrue    []bool
	sharedInOrder []int
)

// Build is NewSnapshot with the builder's memory of its last build. The resources in res are
// served from then on and must not be modified: a change is a new object (as Translator makes).
func (b *Builder) Build(res *Resources, bundle *identity.Bundle) (*Snapshot, error) {
	byType := map[resource.Type][]types.Resource{
		resource.ListenerType: asResources(res.Listeners),
		resource.RouteType:    asResources(res.Routes),
		resource.ClusterType:  asResources(res.Clusters),
		resource.EndpointType: asResources(res.Endpoints),
	}
	var secrets []types.Resource
	if bundle != nil {
		for _, s := range Secrets(bundle) {
			secrets = append(secrets, s)
		}
	}
	for _, s := range secrets {
		if err := ValidateDeep(s); err != nil {
			return nil, fmt.Errorf("invalid secret %q: %w", cache.GetResourceName(s), err)
		}
	}
	snap := &Served{byType: map[string]*servedType{}}
	configHash := sha256.New()
	next := map[resource.Type]*typeState{}
	changes := map[resource.Type]*change{}
	var newHosts map[*route.VirtualHost]digest
	clusterSums := map[string]*[32]byte{} // changes to b.clusterSums: nil for a cluster gone
	reversion := map[string]bool{}        // endpoints whose cluster changed
	// allSums are the clusters' sums by EDS name when all clusters are digested anew (a full
	// build): then every endpoint is versioned again, and allSums is the next b.clusterSums.
	var allSums map[string][32]byte
	limit := b.maxMessageBytes()
	changed := map[string][]string{}
	// A type's versions are filled on one core while the next type is digested on every core.
	finish := func(typ resource.Type, items []types.Resource, c *change) error {
		st := &typeState{items: items, digests: c.digests, size: perResponseOverhead}
		var vers []resourceVersion // items' delta versions
		var cand []int             // indices in items whose version may differ from the last build's
		var gone []string
		known := !c.full
		if !c.full && len(c.todo) == 0 && len(c.gone) == 0 && (typ != resource.EndpointType || len(reversion) == 0 && allSums == nil) {
			vers, st.size = c.prev.served.vers, c.prev.size // as they were
		} else {
			vers = make([]resourceVersion, len(items))
			if !c.full {
				st.size = c.prev.size
				for i, j := range c.prevAt {
					if c.same[i] {
						vers[i] = c.prev.served.vers[j]
					}
				}
			}
			for _, j := range c.gone {
				r := c.prev.items[j]
				name := cache.GetResourceName(r)
				gone = append(gone, name)
				st.size -= responseBytes(typ, c.prev.digests[j].size, name)
				if cl, ok := r.(*clusterv3.Cluster); ok {
					clusterSums[edsName(cl)] = nil
					reversion[edsName(cl)] = true
				}
			}
		}
		if typ == resource.ClusterType && c.full {
			allSums = make(map[string][32]byte, len(items))
		}
		update := func(i int) {
			r, d := items[i], c.digests[i]
			name := cache.GetResourceName(r)
			if known {
				cand = append(cand, i)
			}
			if j := c.prevAt[i]; j >= 0 {
				st.size -= responseBytes(typ, c.prev.digests[j].size, name)
			}
			st.size += responseBytes(typ, d.size, name)
			vers[i] = versionOf(d.sum)
			if cl, ok := r.(*clusterv3.Cluster); ok && allSums != nil {
				allSums[edsName(cl)] = d.sum
			} else if ok {
				if j := c.prevAt[i]; j >= 0 {
					if old := edsName(c.prev.items[j].(*clusterv3.Cluster)); old != edsName(cl) {
						clusterSums[old], reversion[old] = nil, true
					}
				}
				sum := d.sum
				clusterSums[edsName(cl)] = &sum
				reversion[edsName(cl)] = true
			}
		}
		for _, i := range c.todo {
			update(i)
		}
		if typ == resource.EndpointType && (c.full || allSums != nil || len(c.todo) > 0 || len(c.gone) > 0 || len(reversion) > 0) {
			// An updated EDS cluster warms until Envoy gets its endpoints again, and delta
			// xDS sends only resources whose version changed: unchanged endpoints would
			// leave the cluster warming until initial_fetch_timeout (15 s). So endpoints
			// are versioned with their cluster, and a cluster change resends them.
			version := func(i int) {
				name := items[i].(*endpoint.ClusterLoadAssignment).GetClusterName()
				d := c.digests[i]
				var sum *[32]byte
				if allSums != nil {
					if s, found := allSums[name]; found {
						sum = &s
					}
				} else if s, ok := clusterSums[name]; ok {
					sum = s
				} else if s, found := b.clusterSums[name]; found {
					sum = &s
				}
				if sum == nil {
					vers[i] = versionOf(d.sum)
					return
				}
				var both [64]byte
				copy(both[:32], d.sum[:])
				copy(both[32:], sum[:])
				vers[i] = versionOf(sha256.Sum256(both[:]))
			}
			if c.full || allSums != nil || len(reversion) > len(items)/4 {
				for i := range items {
					version(i)
				}
				known = false
			} else {
				for _, i := range c.todo {
					version(i)
				}
				for name := range reversion {
					if i, ok := indexByName(items, name); ok && c.same[i] {
						version(i)
						cand = append(cand, i)
					}
				}
			}
		}
		// A data plane takes one response of each type whole; one it cannot receive must
		// never be served (it would drop the stream and retry forever), so refuse it here,
		// where the last good snapshot keeps serving.
		if st.size > limit {
			return fmt.Errorf("the %s response would be over %d bytes (%d %ss), past the %d-byte limit of one xDS message; split the catalog across fleets",
				TypeName(typ), st.size, len(items), TypeName(typ), limit)
		}
		v := c.prev.versionIfUnchanged(c, typ)
		if v == "" {
			// The resources' versions in name order: 8 bytes each (a quarter of their sums) to
			// hash for every changed type.
			typeHash := sha256.New()
			var chunk [4096]byte
			n := 0
			for _, rv := range vers {
				if n == len(chunk) {
					typeHash.Write(chunk[:])
					n = 0
				}
				n += copy(chunk[n:], rv[:])
			}
			typeHash.Write(chunk[:n])
			if typ == resource.EndpointType {
				// The same for state of the world: a changed cluster changes the endpoints'
				// version, so the cache answers the endpoints request Envoy makes for the
				// warming cluster at once (an unchanged version would leave it waiting for the
				// 15 s initial_fetch_timeout).
				typeHash.Write([]byte(snap.byType[resource.ClusterType].version))
			}
			v = hex.EncodeToString(typeHash.Sum(nil))[:16]
		}
		configHash.Write([]byte(typ + "=" + v + ";"))
		if c.unchanged && v == c.prev.served.version && len(vers) > 0 && &vers[0] == &c.prev.served.vers[0] {
			st.served = c.prev.served // the very same type: the delta cache skips it
		} else {
			st.served = &servedType{version: v, items: items, vers: vers}
		}
		snap.byType[typ] = st.served
		next[typ] = st
		if known {
			names := gone
			for _, i := range cand {
				if j := c.prevAt[i]; j < 0 || vers[i] != c.prev.served.vers[j] {
					names = append(names, cache.GetResourceName(items[i]))
				}
			}
			changed[typ] = names
		}
		return nil
	}
	var pending chan error
	wait := func() error {
		if pending == nil {
			return nil
		}
		err := <-pending
		pending = nil
		return err
	}
	for _, typ := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		items := byType[typ]
		c := diff(b.last[typ], items)
		if c.full && !sortedByName(items) {
			// Served types are looked up by name in sorted order (see Served).
			sorted, twice := sortByName(items)
			if twice != "" {
				return nil, fmt.Errorf("two %ss are named %q: each %s needs a name of its own", TypeName(typ), twice, TypeName(typ))
			}
			items = sorted
			c = diff(nil, items)
			c.prev = b.last[typ]
		}
		changes[typ] = c
		hosts, err := b.digest(typ, c, res.packed)
		if werr := wait(); werr != nil { // the earlier type's error first
			return nil, werr
		}
		if err != nil {
			return nil, err
		}
		if hosts != nil {
			newHosts = hosts
		}
		done := make(chan error, 1)
		pending = done
		go func() { done <- finish(typ, items, c) }()
	}
	if err := wait(); err != nil {
		return nil, err
	}
	out := &Snapshot{Cache: snap, ConfigVersion: hex.EncodeToString(configHash.Sum(nil))[:16], base: b.lastSnap, changed: changed}
	secretsServed := &servedType{}
	if bundle != nil {
		sum := sha256.Sum256(append(append([]byte{}, bundle.CertChainPEM...), bundle.RootsPEM...))
		out.SecretsVersion = hex.EncodeToString(sum[:])[:16]
		secretsServed.version = out.SecretsVersion
		secretsServed.items, _ = sortByName(secrets) // two, named apart
		for range secretsServed.items {
			// Per-secret delta versions hash the public parts only, like SecretsVersion.
			secretsServed.vers = append(secretsServed.vers, versionOf(sum))
		}
	}
	snap.byType[resource.SecretType] = secretsServed
	// The sums validated this build, when they replace the ones remembered: gathered on one core
	// while the references are checked on the other.
	var validated map[[32]byte]struct{}
	gathered := make(chan struct{})
	go func() {
		defer close(gathered)
		if b.forgetValidated(changes) {
			validated = allSumsOf(next)
		}
	}()
	counts, err := b.consistent(snap, changes, next)
	<-gathered
	if err != nil {
		return nil, fmt.Errorf("inconsistent snapshot: %w", err)
	}
	b.commit(next, changes, newHosts, clusterSums, allSums, validated, counts)
	b.lastSnap = snap
	return out, nil
}

func asResources[T types.Resource](items []T) []types.Resource {
	out := make([]types.Resource, len(items))
	for i, r := range items {
		out[i] = r
	}
	return out
}

// indexByName finds the resource named name in items, sorted by name.
func indexByName(items []types.Resource, name string) (int, bool) {
	return byName(items, name, cache.GetResourceName)
}

// commit makes a successful build the one the next compares with. What it keeps is proportional
// to the catalog: the current resources, their digests and references.
func (b *Builder) commit(next map[resource.Type]*typeState, changes map[resource.Type]*change, hosts map[*route.VirtualHost]digest,
	clusterSums map[string]*[32]byte, allSums map[string][32]byte, validated map[[32]byte]struct{}, counts map[resource.Type]map[string]int) {
	if validated != nil {
		b.validated = validated
	} else {
		for typ, c := range changes {
			for _, i := range c.todo {
				b.validated[next[typ].digests[i].sum] = struct{}{}
			}
		}
	}
	if allSums != nil {
		b.clusterSums = allSums
	} else if c := changes[resource.ClusterType]; c.full || b.clusterSums == nil {
		b.clusterSums = map[string][32]byte{}
		for i, r := range next[resource.ClusterType].items {
			b.clusterSums[edsName(r.(*clusterv3.Cluster))] = next[resource.ClusterType].digests[i].sum
		}
	} else {
		for name, sum := range clusterSums {
			if sum == nil {
				delete(b.clusterSums, name)
			} else {
				b.clusterSums[name] = *sum
			}
		}
	}
	if hosts != nil {
		b.vhosts = hosts
	}
	b.refCount = counts
	b.last = next
}

// forgetValidated says whether the sums validated before are replaced by this build's, rather
// than this build's added to them: after a full build, or when they have grown well past what
// is served.
func (b *Builder) forgetValidated(changes map[resource.Type]*change) bool {
	for _, c := range changes {
		if c.full {
			return true
		}
	}
	return b.validated == nil || len(b.validated) > 4*(1024+len(b.clusterSums))
}

// allSumsOf are the sums of every resource in next.
func allSumsOf(next map[resource.Type]*typeState) map[[32]byte]struct{} {
	n := 0
	for _, st := range next {
		n += len(st.digests)
	}
	sums := make(map[[32]byte]struct{}, n)
	for _, st := range next {
		for _, d := range st.digests {
			sums[d.sum] = struct{}{}
		}
	}
	return sums
}

// consistent is the cache's Snapshot.Consistent (every route and endpoint resource is referenced
// by a listener or cluster, and every reference resolves), checked for what changed: the last
// build was consistent. Each resource's references are found by the cache's own
// GetResourceReferences, once per resource object: finding a listener's routes means decoding its
// filters, which at 10,000 listeners is a large part of a full build. It fills the listeners' and
// clusters' refs and returns the reference counts of this build.
func (b *Builder) consistent(snap *Served, changes map[resource.Type]*change, next map[resource.Type]*typeState) (map[resource.Type]map[string]int, error) {
	refOf := map[resource.Type]resource.Type{resource.ListenerType: resource.RouteType, resource.ClusterType: resource.EndpointType}
	counts := map[resource.Type]map[string]int{}
	touched := map[resource.Type]map[string]bool{}
	for _, typ := range []resource.Type{resource.ListenerType, resource.ClusterType} {
		c, st, target := changes[typ], next[typ], refOf[typ]
		full := c.full || b.refCount == nil
		var delta map[string]int // on the last build's counts; all of them for a full build
		if c.full {
			delta = make(map[string]int, len(st.items)) // and touched are its names
		} else {
			delta, touched[target] = map[string]int{}, map[string]bool{}
		}
		add := func(rr []string, n int) {
			for _, name := range rr {
				delta[name] += n
				if !c.full {
					touched[target][name] = true
				}
			}
		}
		if c.unchanged && !full {
			st.refs = c.prev.refs // the same objects reference the same names
			counts[target] = b.refCount[target]
			continue
		}
		st.refs = make([][]string, len(st.items))
		for i, r := range st.items {
			if c.same[i] {
				st.refs[i] = c.prev.refs[c.prevAt[i]]
				if !c.full {
					continue
				}
			} else {
				st.refs[i] = references(r, target)
				if j := c.prevAt[i]; !c.full && j >= 0 {
					add(c.prev.refs[j], -1)
				}
			}
			add(st.refs[i], 1)
		}
		if !c.full {
			for _, j := range c.gone {
				add(c.prev.refs[j], -1)
			}
		}
		switch {
		case !full && !slices.ContainsFunc(slices.Collect(maps.Values(delta)), func(n int) bool { return n != 0 }):
			counts[target] = b.refCount[target] // the same references: shared, never modified
			continue
		case full:
			counts[target] = delta
		default:
			counts[target] = maps.Clone(b.refCount[target])
			for name, n := range delta {
				counts[target][name] += n
			}
		}
		for name := range touched[target] {
			if counts[target][name] == 0 {
				delete(counts[target], name)
			}
		}
	}
	refBy := map[resource.Type]resource.Type{resource.RouteType: resource.ListenerType, resource.EndpointType: resource.ClusterType}
	for _, typ := range []resource.Type{resource.RouteType, resource.EndpointType} {
		served := snap.typ(typ)
		has := func(name string) bool {
			_, _, ok := served.lookup(name)
			return ok
		}
		c := changes[typ]
		if c.full || changes[refBy[typ]].full {
			if err := referencedExactly(typ, served, counts[typ]); err != nil {
				return nil, err
			}
			continue
		}
		// Referenced names that may be new: the touched ones (the last build was consistent).
		for name := range touched[typ] {
			if counts[typ][name] > 0 && !has(name) {
				return nil, fmt.Errorf("%s %q is referenced but not in the snapshot", TypeName(typ), name)
			}
		}
		check := func(name string) error {
			if has(name) && counts[typ][name] == 0 {
				return fmt.Errorf("%s %q is in the snapshot but nothing references it", TypeName(typ), name)
			}
			if counts[typ][name] > 0 && !has(name) {
				return fmt.Errorf("%s %q is referenced but not in the snapshot", TypeName(typ), name)
			}
			return nil
		}
		for name := range touched[typ] {
			if err := check(name); err != nil {
				return nil, err
			}
		}
		for _, i := range c.todo {
			if err := check(cache.GetResourceName(c.items[i])); err != nil {
				return nil, err
			}
		}
		for _, j := range c.gone {
			if err := check(cache.GetResourceName(c.prev.items[j])); err != nil {
				return nil, err
			}
		}
	}
	return counts, nil
}

// referencedExactly checks a whole type against its reference counts: every served resource is
// referenced, and every referenced name is served. Served names are unique, so the second holds
// when as many names are referenced as served ones are: no search for each of 20,000 names.
func referencedExactly(typ resource.Type, served *servedType, counts map[string]int) error {
	for _, r := range served.items {
		if name := cache.GetResourceName(r); counts[name] == 0 {
			return fmt.Errorf("%s %q is in the snapshot but nothing references it", TypeName(typ), name)
		}
	}
	referenced := 0
	for _, n := range counts {
		if n > 0 {
			referenced++
		}
	}
	if referenced == len(served.items) {
		return nil
	}
	for _, name := range slices.Sorted(maps.Keys(counts)) { // the first missing, by name
		if _, _, ok := served.lookup(name); !ok && counts[name] > 0 {
			return fmt.Errorf("%s %q is referenced but not in the snapshot", TypeName(typ), name)
		}
	}
	return nil
}

// references are the names of the routes a listener references, or of the endpoints a cluster
// does, as the cache's GetResourceReferences finds them. A cluster references endpoints when it
// is of type EDS; a listener references routes only through an HTTP connection manager, which
// the cache decodes from each filter: a listener with none (every TCP port's) is not given to it.
func references(r types.Resource, target resource.Type) []string {
	switch r := r.(type) {
	case *clusterv3.Cluster:
		if _, ok := r.GetClusterDiscoveryType().(*clusterv3.Cluster_Type); ok && r.GetType() == clusterv3.Cluster_EDS {
			return []string{edsName(r)}
		}
		return nil
	case *listener.Listener:
		if !hasHCM(r.GetDefaultFilterChain()) && !slices.ContainsFunc(r.GetFilterChains(), hasHCM) {
			return nil
		}
	}
	refs := cache.GetResourceReferences(map[string]types.ResourceWithTTL{cache.GetResourceName(r): {Resource: r}})
	return slices.Sorted(maps.Keys(refs[target]))
}

func hasHCM(fc *listener.FilterChain) bool {
	return slices.ContainsFunc(fc.GetFilters(), func(f *listener.Filter) bool {
		return f.GetTypedConfig().MessageIs((*hcm.HttpConnectionManager)(nil))
	})
}

// edsName is the name of the endpoints an EDS cluster takes.
func edsName(c *clusterv3.Cluster) string {
	if n := c.GetEdsClusterConfig().GetServiceName(); n != "" {
		return n
	}
	return c.GetName()
}

// digest is what a build remembers of one resource. It holds no pointer, so the collector does
// not scan the builder's arrays of them (60,000 at 10,000 services).
type digest struct {
	sum  [32]byte
	size int // marshaled bytes
}

// digest marshals, hashes and (unless validated before) validates the new and changed items, on
// every core: these are independent, and at 10,000 services they are most of a build. The Anys
// in packed are validated already (see packer). For route configurations it returns the virtual
// hosts of this build (nil for other types).
func (b *Builder) digest(typ resource.Type, c *change, packed packedSets) (map[*route.VirtualHost]digest, error) {
	items, out, todo := c.items, c.digests, c.todo
	errs := make([]error, len(todo)) // by position in todo, which is in resource order
	var hostDigests [][]digest       // per item, for route configurations
	if typ == resource.RouteType {
		hostDigests = make([][]digest, len(items))
	}
	parallelWorkers(len(todo), func(w, workers int) {
		// One buffer per worker: each resource's bytes are needed only to hash and validate it.
		m := marshaler{opts: proto.MarshalOptions{Deterministic: true}}
		v := deepValidator{trusted: packed}
		for j := w; j < len(todo); j += workers {
			i := todo[j]
			r := items[i]
			if rc, ok := r.(*route.RouteConfiguration); ok {
				d, hosts, err := b.digestRoutes(rc, &m, &v)
				out[i], hostDigests[i] = d, hosts
				if err != nil {
					errs[j] = fmt.Errorf("invalid %s %q: %w", TypeName(typ), rc.GetName(), err)
				}
				continue
			}
			raw, err := m.marshal(r)
			if err != nil {
				errs[j] = fmt.Errorf("%s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
				continue
			}
			out[i] = newDigest(sha256.Sum256(raw), len(raw))
			if _, ok := b.validated[out[i].sum]; ok {
				continue
			}
			if err := v.validate(r, raw); err != nil {
				errs[j] = fmt.Errorf("invalid %s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
			}
		}
	})
	for _, err := range errs { // the first in resource order, whatever the scheduling
		if err != nil {
			return nil, err
		}
	}
	if typ != resource.RouteType {
		return nil, nil
	}
	if len(todo) == 0 && !c.full && b.vhosts != nil {
		return b.vhosts, nil
	}
	hosts := map[*route.VirtualHost]digest{}
	for i, r := range items {
		ds := hostDigests[i]
		if ds == nil {
			ds = b.hostDigests(r.(*route.RouteConfiguration))
		}
		for k, vh := range r.(*route.RouteConfiguration).GetVirtualHosts() {
			hosts[vh] = ds[k]
		}
	}
	return hosts, nil
}

// marshaler marshals into one buffer, reused: what it returns is valid until the next call.
type marshaler struct {
	opts proto.MarshalOptions
	buf  []byte
}

func (m *marshaler) marshal(r proto.Message) ([]byte, error) {
	var err error
	m.buf, err = m.opts.MarshalAppend(m.buf[:0], r)
	return m.buf, err
}

func newDigest(sum [32]byte, size int) digest {
	return digest{sum: sum, size: size}
}

// digestRoutes digests and validates a route configuration a virtual host at a time, taking the
// hosts of the last build as they were. Its sum hashes the configuration without its hosts, then
// each host's sum: as deterministic as hashing the whole, without marshaling every service's
// host for a change to one. Its configuration's own rules on virtual_hosts are per item, so
// validating the rest and each host is the same check as validating the whole.
func (b *Builder) digestRoutes(rc *route.RouteConfiguration, m *marshaler, v *deepValidator) (digest, []digest, error) {
	// rc is this build's own (not digested before, so not served yet): its list of hosts can be
	// set aside while the rest is marshaled and validated.
	hosts := rc.VirtualHosts
	rc.VirtualHosts = nil
	raw, err := m.marshal(rc)
	if err == nil {
		err = v.validate(rc, raw)
	}
	rc.VirtualHosts = hosts
	if err != nil {
		return digest{}, nil, err
	}
	h := sha256.New()
	h.Write(raw)
	size := len(raw)
	ds := b.hostDigests(rc)
	var todo []int         // new hosts: marshaled and validated on every core (one configuration holds
	for i := range hosts { // every service's host on its port)
		if ds[i] == (digest{}) { // no SHA-256 is all zeros
			todo = append(todo, i)
		}
	}
	errs := make([]error, len(todo))
	parallelWorkers(len(todo), func(w, workers int) {
		wm, wv := m, v
		if w > 0 {
			wm, wv = &marshaler{opts: m.opts}, &deepValidator{trusted: v.trusted}
		}
		for j := w; j < len(todo); j += workers {
			i := todo[j]
			raw, err := wm.marshal(hosts[i])
			if err == nil {
				err = wv.validate(hosts[i], raw)
			}
			if err != nil {
				errs[j] = fmt.Errorf("virtual_hosts[%d] (%s): %w", i, hosts[i].GetName(), err)
				continue
			}
			ds[i] = newDigest(sha256.Sum256(raw), len(raw))
		}
	})
	for _, err := range errs { // the first in host order
		if err != nil {
			return digest{}, nil, err
		}
	}
	for i := range hosts {
		h.Write(ds[i].sum[:])
		size += protowire.SizeTag(2) + protowire.SizeBytes(ds[i].size)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return newDigest(sum, size), ds, nil
}

// hostDigests are the last build's digests of rc's virtual hosts; a zero digest for a new one.
func (b *Builder) hostDigests(rc *route.RouteConfiguration) []digest {
	ds := make([]digest, len(rc.GetVirtualHosts()))
	for i, vh := range rc.GetVirtualHosts() {
		ds[i] = b.vhosts[vh]
	}
	return ds
}

// versionIfUnchanged is the type's last version when the type is unchanged (the endpoints'
// follows the clusters' too, so it is always hashed again), or "".
func (st *typeState) versionIfUnchanged(c *change, typ resource.Type) string {
	if st == nil || !c.unchanged || typ == resource.EndpointType {
		return ""
	}
	return st.served.version
}

package controlplane

import (
	"encoding/hex"
	"slices"
	"strings"
	"sync"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
)

// Served is a snapshot's resources as served: per type, sorted by name, with each resource's
// delta xDS version. It is the cache.ResourceSnapshot the state-of-the-world cache serves, and
// what the delta cache reads. go-control-plane's cache.Snapshot holds two maps of every name per
// type; at 10,000 services, cloning them for each changed type was most of what a one-service
// change allocated. Here a build shares an unchanged type with the last build, and a changed
// type costs a slice of versions (no pointers, so the collector does not scan it); the maps the
// ResourceSnapshot methods return are made on first use (state of the world, which sends whole
// types anyway) and kept with the type. Never modified once built.
type Served struct {
	byType map[string]*servedType // by type URL
}

// servedType is one type's resources as served.
type servedType struct {
	version string           // the type's version (state of the world)
	items   []types.Resource // sorted by name; names unique
	vers    []resourceVersion

	mapsOnce sync.Once
	withTTL  map[string]types.ResourceWithTTL
	plain    map[string]types.Resource
	versions map[string]string
}

// resourceVersion is a resource's delta version: the first 8 bytes of a SHA-256, served as hex.
type resourceVersion [8]byte

func (v resourceVersion) String() string { return hex.EncodeToString(v[:]) }

func versionOf(sum [32]byte) (v resourceVersion) {
	copy(v[:], sum[:8])
	return v
}

func (s *Served) typ(typeURL string) *servedType {
	if s == nil {
		return nil
	}
	return s.byType[typeURL]
}

// lookup finds the resource named name of the type, and its delta version.
func (st *servedType) lookup(name string) (types.Resource, resourceVersion, bool) {
	if st == nil {
		return nil, resourceVersion{}, false
	}
	i, ok := indexByName(st.items, name)
	if !ok {
		return nil, resourceVersion{}, false
	}
	return st.items[i], st.vers[i], true
}

func (st *servedType) len() int {
	if st == nil {
		return 0
	}
	return len(st.items)
}

func (st *servedType) maps() *servedType {
	st.mapsOnce.Do(func() {
		st.withTTL = make(map[string]types.ResourceWithTTL, len(st.items))
		st.plain = make(map[string]types.Resource, len(st.items))
		st.versions = make(map[string]string, len(st.items))
		for i, r := range st.items {
			name := cache.GetResourceName(r)
			st.withTTL[name] = types.ResourceWithTTL{Resource: r}
			st.plain[name] = r
			st.versions[name] = st.vers[i].String()
		}
	})
	return st
}

// GetVersion is the type's version ("" for a type not served).
func (s *Served) GetVersion(typeURL string) string {
	if st := s.typ(typeURL); st != nil {
		return st.version
	}
	return ""
}

// GetResourcesAndTTL are the type's resources by name (none has a TTL). Not to be modified.
func (s *Served) GetResourcesAndTTL(typeURL string) map[string]types.ResourceWithTTL {
	if st := s.typ(typeURL); st != nil {
		return st.maps().withTTL
	}
	return nil
}

// GetResources are the type's resources by name. Not to be modified.
func (s *Served) GetResources(typeURL string) map[string]types.Resource {
	if st := s.typ(typeURL); st != nil {
		return st.maps().plain
	}
	return nil
}

// ConstructVersionMap does nothing: the versions are built with the snapshot.
func (s *Served) ConstructVersionMap() error { return nil }

// GetVersionMap are the type's delta versions by name. Not to be modified.
func (s *Served) GetVersionMap(typeURL string) map[string]string {
	if st := s.typ(typeURL); st != nil {
		return st.maps().versions
	}
	return nil
}

var _ cache.ResourceSnapshot = (*Served)(nil)

// sortedByName says whether items are sorted by name with no name twice.
func sortedByName(items []types.Resource) bool {
	for i := 1; i < len(items); i++ {
		if cache.GetResourceName(items[i-1]) >= cache.GetResourceName(items[i]) {
			return false
		}
	}
	return true
}

// sortByName is a sorted copy of items, or the first name found twice in them.
func sortByName(items []types.Resource) ([]types.Resource, string) {
	items = slices.Clone(items)
	slices.SortStableFunc(items, func(a, b types.Resource) int {
		return strings.Compare(cache.GetResourceName(a), cache.GetResourceName(b))
	})
	for i := 1; i < len(items); i++ {
		if name := cache.GetResourceName(items[i]); name == cache.GetResourceName(items[i-1]) {
			return nil, name
		}
	}
	return items, ""
}

func (st *servedType) itemsOrNil() []types.Resource {
	if st == nil {
		return nil
	}
	return st.items
}

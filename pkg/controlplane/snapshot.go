package controlplane

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"runtime"
	"sync"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

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
	Cache *cache.Snapshot
	// ConfigVersion is the hash of listeners, routes, clusters and endpoints: identical on every
	// peer that has the same catalog and gateways. Secrets are versioned apart because each node
	// may hold its own key (e.g. issued on the node), and their version hashes only the public
	// certificates, never the key.
	ConfigVersion  string
	SecretsVersion string
}

// NewSnapshot validates every resource (including the typed configs inside them) and the
// references between them, and versions each type by a hash of its content.
func NewSnapshot(res *Resources, bundle *identity.Bundle) (*Snapshot, error) {
	return (&Builder{}).Build(res, bundle)
}

// Builder builds snapshots and remembers which resource contents it has already validated, so a
// rebuild after a small catalog change validates only what changed. Safe for one goroutine.
type Builder struct {
	validated map[[32]byte]struct{}
	// digested are the last build's resources: one passed again (a Translator hands back the
	// same object for an unchanged service) is neither marshaled nor validated again.
	digested map[types.Resource]digest
	// vhosts are the virtual hosts of the last build's route configurations, digested and
	// valid: a route configuration holds every service's virtual host on its port, and a change
	// to one service must not marshal and validate all of them again.
	vhosts map[*route.VirtualHost]digest
	// refs are the route and endpoint names the last build's listeners and clusters reference.
	refs map[types.Resource]map[resource.Type]map[string]bool
	// MaxMessageBytes is the largest xDS message a data plane takes; a snapshot with a response
	// larger than that is refused. Zero means xdslimit.MaxMessageBytes.
	MaxMessageBytes int
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

// Build is NewSnapshot with the builder's memory of its last build. The resources in res are
// served from then on and must not be modified: a change is a new object (as Translator makes).
func (b *Builder) Build(res *Resources, bundle *identity.Bundle) (*Snapshot, error) {
	byType := map[resource.Type][]types.Resource{}
	for _, l := range res.Listeners {
		byType[resource.ListenerType] = append(byType[resource.ListenerType], l)
	}
	for _, r := range res.Routes {
		byType[resource.RouteType] = append(byType[resource.RouteType], r)
	}
	for _, c := range res.Clusters {
		byType[resource.ClusterType] = append(byType[resource.ClusterType], c)
	}
	for _, e := range res.Endpoints {
		byType[resource.EndpointType] = append(byType[resource.EndpointType], e)
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
	snap := &cache.Snapshot{VersionMap: map[string]map[string]string{}}
	configHash := sha256.New()
	seen := make(map[[32]byte]struct{}, len(b.validated))
	digested := make(map[types.Resource]digest, len(b.digested))
	vhosts := map[*route.VirtualHost]digest{}
	clusterSums := make(map[string][32]byte, len(byType[resource.ClusterType])) // by EDS name
	limit := b.maxMessageBytes()
	for _, typ := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		items := byType[typ]
		digests, err := b.digest(typ, items, vhosts)
		if err != nil {
			return nil, err
		}
		typeHash := sha256.New()
		versions := make(map[string]string, len(items))
		size := perResponseOverhead
		for i, r := range items {
			d := digests[i]
			// A data plane takes one response of each type whole; one it cannot receive must
			// never be served (it would drop the stream and retry forever), so refuse it here,
			// where the last good snapshot keeps serving.
			if size += responseBytes(typ, d.size, cache.GetResourceName(r)); size > limit {
				return nil, fmt.Errorf("the %s response would be over %d bytes (%d %ss), past the %d-byte limit of one xDS message; split the catalog across fleets",
					TypeName(typ), size, len(items), TypeName(typ), limit)
			}
			seen[d.sum] = struct{}{}
			digested[r] = d
			typeHash.Write(d.sum[:])
			versions[cache.GetResourceName(r)] = d.version
			switch r := r.(type) {
			case *clusterv3.Cluster:
				clusterSums[edsName(r)] = d.sum
			case *endpoint.ClusterLoadAssignment:
				// An updated EDS cluster warms until Envoy gets its endpoints again, and delta
				// xDS sends only resources whose version changed: unchanged endpoints would
				// leave the cluster warming until initial_fetch_timeout (15 s). So endpoints
				// are versioned with their cluster, and a cluster change resends them.
				if c, ok := clusterSums[r.GetClusterName()]; ok {
					v := sha256.Sum256(append(d.sum[:], c[:]...))
					versions[r.GetClusterName()] = hex.EncodeToString(v[:8])
				}
			}
		}
		v := hex.EncodeToString(typeHash.Sum(nil))[:16]
		configHash.Write([]byte(typ + "=" + v + ";"))
		snap.Resources[cache.GetResponseType(typ)] = cache.NewResources(v, items)
		snap.VersionMap[typ] = versions
	}
	out := &Snapshot{Cache: snap, ConfigVersion: hex.EncodeToString(configHash.Sum(nil))[:16]}
	secretVersions := map[string]string{}
	if bundle != nil {
		sum := sha256.Sum256(append(append([]byte{}, bundle.CertChainPEM...), bundle.RootsPEM...))
		out.SecretsVersion = hex.EncodeToString(sum[:])[:16]
		for _, s := range secrets {
			// Per-secret delta versions hash the public parts only, like SecretsVersion.
			secretVersions[cache.GetResourceName(s)] = out.SecretsVersion
		}
	}
	snap.Resources[types.Secret] = cache.NewResources(out.SecretsVersion, secrets)
	snap.VersionMap[resource.SecretType] = secretVersions
	refs, err := b.consistent(snap, byType)
	if err != nil {
		return nil, fmt.Errorf("inconsistent snapshot: %w", err)
	}
	// Remember only the current contents, so memory stays proportional to the catalog.
	b.validated, b.digested, b.vhosts, b.refs = seen, digested, vhosts, refs
	return out, nil
}

// consistent is the cache's Snapshot.Consistent (every route and endpoint resource is referenced
// by a listener or cluster, and every reference resolves) with each resource's references found
// by the cache's own GetResourceReferences, once per resource object: finding a listener's routes
// means decoding its filters, which at 10,000 listeners is a large part of a rebuild.
func (b *Builder) consistent(snap *cache.Snapshot, byType map[resource.Type][]types.Resource) (map[types.Resource]map[resource.Type]map[string]bool, error) {
	refs := make(map[types.Resource]map[resource.Type]map[string]bool, len(b.refs))
	want := map[resource.Type]map[string]bool{resource.RouteType: {}, resource.EndpointType: {}}
	for _, typ := range []resource.Type{resource.ListenerType, resource.ClusterType} {
		for _, r := range byType[typ] {
			rr, ok := b.refs[r]
			if !ok {
				rr = cache.GetResourceReferences(map[string]types.ResourceWithTTL{cache.GetResourceName(r): {Resource: r}})
			}
			refs[r] = rr
			for t, names := range rr {
				if want[t] != nil {
					for n := range names {
						want[t][n] = true
					}
				}
			}
		}
	}
	for _, typ := range []resource.Type{resource.RouteType, resource.EndpointType} {
		have := snap.Resources[cache.GetResponseType(typ)].Items
		for n := range want[typ] {
			if _, ok := have[n]; !ok {
				return nil, fmt.Errorf("%s %q is referenced but not in the snapshot", TypeName(typ), n)
			}
		}
		for n := range have {
			if !want[typ][n] {
				return nil, fmt.Errorf("%s %q is in the snapshot but nothing references it", TypeName(typ), n)
			}
		}
	}
	return refs, nil
}

// edsName is the name of the endpoints an EDS cluster takes.
func edsName(c *clusterv3.Cluster) string {
	if n := c.GetEdsClusterConfig().GetServiceName(); n != "" {
		return n
	}
	return c.GetName()
}

type digest struct {
	sum     [32]byte
	size    int    // marshaled bytes
	version string // the delta xDS version: the sum's first 8 bytes in hex
}

// digest marshals, hashes and (unless validated before) validates items, on every core: these
// are independent, and at 10,000 services they are most of a build. Items digested by the last
// build are taken as they were. The virtual hosts of valid route configurations go to vhosts.
func (b *Builder) digest(typ resource.Type, items []types.Resource, vhosts map[*route.VirtualHost]digest) ([]digest, error) {
	out := make([]digest, len(items))
	errs := make([]error, len(items))
	var mu sync.Mutex // vhosts
	keepHosts := func(rc *route.RouteConfiguration, ds []digest) {
		mu.Lock()
		defer mu.Unlock()
		for i, vh := range rc.GetVirtualHosts() {
			vhosts[vh] = ds[i]
		}
	}
	var todo []int
	for i, r := range items {
		if d, ok := b.digested[r]; ok {
			out[i] = d
			if rc, ok := r.(*route.RouteConfiguration); ok {
				keepHosts(rc, b.hostDigests(rc))
			}
			continue
		}
		todo = append(todo, i)
	}
	workers := min(runtime.GOMAXPROCS(0), max(1, len(todo)/64))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			marshal := proto.MarshalOptions{Deterministic: true}
			for j := w; j < len(todo); j += workers {
				i := todo[j]
				r := items[i]
				if rc, ok := r.(*route.RouteConfiguration); ok {
					d, hosts, err := b.digestRoutes(rc, marshal)
					out[i] = d
					if err == nil {
						keepHosts(rc, hosts)
					} else {
						errs[i] = fmt.Errorf("invalid %s %q: %w", TypeName(typ), rc.GetName(), err)
					}
					continue
				}
				raw, err := marshal.Marshal(r)
				if err != nil {
					errs[i] = fmt.Errorf("%s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
					continue
				}
				out[i] = newDigest(sha256.Sum256(raw), len(raw))
				if _, ok := b.validated[out[i].sum]; ok {
					continue
				}
				if err := ValidateDeep(r); err != nil {
					errs[i] = fmt.Errorf("invalid %s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
				}
			}
		}()
	}
	wg.Wait()
	for _, err := range errs { // the first in resource order, whatever the scheduling
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

func newDigest(sum [32]byte, size int) digest {
	return digest{sum: sum, size: size, version: hex.EncodeToString(sum[:8])}
}

// digestRoutes digests and validates a route configuration a virtual host at a time, taking the
// hosts of the last build as they were. Its sum hashes the configuration without its hosts, then
// each host's sum: as deterministic as hashing the whole, without marshaling every service's
// host for a change to one. Its configuration's own rules on virtual_hosts are per item, so
// validating the rest and each host is the same check as validating the whole.
func (b *Builder) digestRoutes(rc *route.RouteConfiguration, marshal proto.MarshalOptions) (digest, []digest, error) {
	// rc is this build's own (not digested before, so not served yet): its list of hosts can be
	// set aside while the rest is marshaled and validated.
	hosts := rc.VirtualHosts
	rc.VirtualHosts = nil
	raw, err := marshal.Marshal(rc)
	if err == nil {
		err = ValidateDeep(rc)
	}
	rc.VirtualHosts = hosts
	if err != nil {
		return digest{}, nil, err
	}
	h := sha256.New()
	h.Write(raw)
	size := len(raw)
	ds := b.hostDigests(rc)
	for i, vh := range hosts {
		if ds[i].version == "" { // new: marshal and validate it
			raw, err := marshal.Marshal(vh)
			if err != nil {
				return digest{}, nil, fmt.Errorf("virtual_hosts[%d] (%s): %w", i, vh.GetName(), err)
			}
			if err := ValidateDeep(vh); err != nil {
				return digest{}, nil, fmt.Errorf("virtual_hosts[%d] (%s): %w", i, vh.GetName(), err)
			}
			ds[i] = newDigest(sha256.Sum256(raw), len(raw))
		}
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

// ValidateDeep runs the generated ValidateAll on m and on every typed config packed in a
// google.protobuf.Any inside it, which ValidateAll alone does not look into.
//
// ValidateAll already checks every nested message, so it runs once per root (m and each unpacked
// Any); the walk between roots only enters fields whose type can reach an Any.
func ValidateDeep(m proto.Message) error {
	if v, ok := m.(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	return validateAnys(m.ProtoReflect(), "")
}

func validateAnys(m protoreflect.Message, path string) error {
	for _, fd := range anyFields(m.Descriptor()) {
		if !m.Has(fd) {
			continue
		}
		p := string(fd.Name())
		if path != "" {
			p = path + "." + p
		}
		v := m.Get(fd)
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				if err := validateAnyOrWalk(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i)); err != nil {
					return err
				}
			}
		case fd.IsMap():
			var err error
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				err = validateAnyOrWalk(mv.Message(), fmt.Sprintf("%s[%v]", p, k.Interface()))
				return err == nil
			})
			if err != nil {
				return err
			}
		default:
			if err := validateAnyOrWalk(v.Message(), p); err != nil {
				return err
			}
		}
	}
	return nil
}

func validateAnyOrWalk(m protoreflect.Message, path string) error {
	a, ok := m.Interface().(*anypb.Any)
	if !ok {
		return validateAnys(m, path)
	}
	inner, err := a.UnmarshalNew()
	if err != nil {
		return fmt.Errorf("%s: cannot decode %s: %v", path, a.GetTypeUrl(), err)
	}
	if err := ValidateDeep(inner); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

var anyName = (&anypb.Any{}).ProtoReflect().Descriptor().FullName()

// anyFieldsCache holds, per message type, its fields through which a google.protobuf.Any can be
// reached at any depth: the only fields ValidateDeep has to enter.
var anyFieldsCache sync.Map // protoreflect.FullName -> []protoreflect.FieldDescriptor

func anyFields(md protoreflect.MessageDescriptor) []protoreflect.FieldDescriptor {
	if v, ok := anyFieldsCache.Load(md.FullName()); ok {
		return v.([]protoreflect.FieldDescriptor)
	}
	var out []protoreflect.FieldDescriptor
	fields := md.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		vd := fd
		if fd.IsMap() {
			vd = fd.MapValue()
		}
		if vd.Message() != nil && reachesAny(vd.Message()) {
			out = append(out, fd)
		}
	}
	anyFieldsCache.Store(md.FullName(), out)
	return out
}

// reachesAny says whether a google.protobuf.Any can occur in a message of type md, searching the
// type graph (types can be recursive, e.g. matchers).
func reachesAny(md protoreflect.MessageDescriptor) bool {
	seen := map[protoreflect.FullName]bool{}
	queue := []protoreflect.MessageDescriptor{md}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		if d.FullName() == anyName {
			return true
		}
		if seen[d.FullName()] {
			continue
		}
		seen[d.FullName()] = true
		fields := d.Fields()
		for i := 0; i < fields.Len(); i++ {
			fd := fields.Get(i)
			if fd.IsMap() {
				fd = fd.MapValue()
			}
			if fd.Message() != nil {
				queue = append(queue, fd.Message())
			}
		}
	}
	return false
}

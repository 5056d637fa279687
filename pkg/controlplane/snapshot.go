package controlplane

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"runtime"
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
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

// Build is NewSnapshot with the builder's validation memory.
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
	limit := b.maxMessageBytes()
	for _, typ := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		items := byType[typ]
		digests, err := b.digest(typ, items)
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
			typeHash.Write(d.sum[:])
			versions[cache.GetResourceName(r)] = hex.EncodeToString(d.sum[:8])
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
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("inconsistent snapshot: %w", err)
	}
	// Remember only the current contents, so memory stays proportional to the catalog.
	b.validated = seen
	return out, nil
}

type digest struct {
	sum  [32]byte
	size int // marshaled bytes
}

// digest marshals, hashes and (unless validated before) validates items, on every core: these
// are independent, and at 10,000 services they are most of a build.
func (b *Builder) digest(typ resource.Type, items []types.Resource) ([]digest, error) {
	out := make([]digest, len(items))
	errs := make([]error, len(items))
	workers := min(runtime.GOMAXPROCS(0), max(1, len(items)/64))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			marshal := proto.MarshalOptions{Deterministic: true}
			var buf []byte
			for i := w; i < len(items); i += workers {
				r := items[i]
				raw, err := marshal.MarshalAppend(buf[:0], r)
				if err != nil {
					errs[i] = fmt.Errorf("%s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
					continue
				}
				buf = raw
				out[i] = digest{sum: sha256.Sum256(raw), size: len(raw)}
				if _, ok := b.validated[out[i].sum]; !ok {
					if err := ValidateDeep(r); err != nil {
						errs[i] = fmt.Errorf("invalid %s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
					}
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

package controlplane

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

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

func responseBytes(typ resource.Type, raw []byte, name string) int {
	any := protowire.SizeTag(1) + protowire.SizeBytes(len(typ)) + protowire.SizeTag(2) + protowire.SizeBytes(len(raw))
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
	snap := &cache.Snapshot{}
	configHash := sha256.New()
	seen := make(map[[32]byte]struct{}, len(b.validated))
	marshal := proto.MarshalOptions{Deterministic: true}
	limit := b.maxMessageBytes()
	for _, typ := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		typeHash := sha256.New()
		size := perResponseOverhead
		for _, r := range byType[typ] {
			raw, err := marshal.Marshal(r)
			if err != nil {
				return nil, fmt.Errorf("%s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
			}
			// A data plane takes one response of each type whole; one it cannot receive must
			// never be served (it would drop the stream and retry forever), so refuse it here,
			// where the last good snapshot keeps serving.
			if size += responseBytes(typ, raw, cache.GetResourceName(r)); size > limit {
				return nil, fmt.Errorf("the %s response would be over %d bytes (%d %ss), past the %d-byte limit of one xDS message; split the catalog across fleets",
					TypeName(typ), size, len(byType[typ]), TypeName(typ), limit)
			}
			sum := sha256.Sum256(raw)
			if _, ok := b.validated[sum]; !ok {
				if err := ValidateDeep(r); err != nil {
					return nil, fmt.Errorf("invalid %s %q: %w", TypeName(typ), cache.GetResourceName(r), err)
				}
			}
			seen[sum] = struct{}{}
			typeHash.Write(sum[:])
		}
		v := hex.EncodeToString(typeHash.Sum(nil))[:16]
		configHash.Write([]byte(typ + "=" + v + ";"))
		snap.Resources[cache.GetResponseType(typ)] = cache.NewResources(v, byType[typ])
	}
	out := &Snapshot{Cache: snap, ConfigVersion: hex.EncodeToString(configHash.Sum(nil))[:16]}
	if bundle != nil {
		sum := sha256.Sum256(append(append([]byte{}, bundle.CertChainPEM...), bundle.RootsPEM...))
		out.SecretsVersion = hex.EncodeToString(sum[:])[:16]
	}
	snap.Resources[types.Secret] = cache.NewResources(out.SecretsVersion, secrets)
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("inconsistent snapshot: %w", err)
	}
	// Remember only the current contents, so memory stays proportional to the catalog.
	b.validated = seen
	return out, nil
}

// ValidateDeep runs the generated ValidateAll on m and on every message inside it, unpacking
// google.protobuf.Any typed configs, which ValidateAll alone does not look into.
func ValidateDeep(m proto.Message) error {
	return validateMessage(m.ProtoReflect(), "")
}

func validateMessage(m protoreflect.Message, path string) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: cannot decode %s: %v", path, a.GetTypeUrl(), err)
		}
		return validateMessage(inner.ProtoReflect(), path)
	}
	if v, ok := m.Interface().(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			if path == "" {
				return err
			}
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Message() == nil {
			return true
		}
		p := string(fd.Name())
		if path != "" {
			p = path + "." + p
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = validateMessage(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i))
			}
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					err = validateMessage(mv.Message(), fmt.Sprintf("%s[%v]", p, k.Interface()))
					return err == nil
				})
			}
		default:
			err = validateMessage(v.Message(), p)
		}
		return err == nil
	})
	return err
}

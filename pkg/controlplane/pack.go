package controlplane

import (
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// packer packs the typed configs of a translation into google.protobuf.Any, validating each
// typed message (ValidateDeep) before it packs it, and remembers the Anys it packed valid. The
// Builder's deep validation takes those as validated instead of decoding them again: at 10,000
// services, decoding every cluster's TLS context to validate it was a large part of a build.
// A typed message that fails validation is packed all the same and not remembered, so the
// Builder decodes it and refuses the resource with the error and its field path. A nil packer
// packs without validating. One packer is for one goroutine.
type packer struct {
	v deepValidator
}

// newPacker is a packer that also takes the Anys in trusted (only read) as validated, inside
// the messages it validates.
func newPacker(trusted packedSets) *packer {
	return &packer{v: deepValidator{valid: packedSet{}, trusted: trusted}}
}

func (p *packer) pack(m proto.Message) *anypb.Any {
	a := mustAny(m)
	if p != nil && p.v.validate(m, a.Value) == nil {
		p.v.remember(p.v.key([]byte(a.TypeUrl), a.Value))
	}
	return a
}

// packed are the Anys validated so far: those packed, and any it decoded inside them.
func (p *packer) packed() packedSet { return p.v.valid }

// packedSet are Anys, by content (type URL and bytes), whose typed message passed ValidateDeep.
type packedSet map[anyKey]struct{}

// packedSets are the sets of a translation's packers, looked up in turn.
type packedSets []packedSet

func (s packedSets) has(k anyKey) bool {
	for _, set := range s {
		if _, ok := set[k]; ok {
			return true
		}
	}
	return false
}

package controlplane

import (
	"crypto/sha256"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/anypb"
)

// ValidateDeep runs the generated ValidateAll on m and on every typed config packed in a
// google.protobuf.Any inside it, which ValidateAll alone does not look into.
//
// ValidateAll already checks every nested message, so it runs once per root (m and each unpacked
// Any). The Anys are found in m's encoding rather than by reflection over m: a build marshals
// every resource for its content hash anyway, and reading those bytes, entering only the fields
// whose type can reach an Any, costs a small part of a reflective walk.
func ValidateDeep(m proto.Message) error {
	raw, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return new(deepValidator).validate(m, raw)
}

// deepValidator is ValidateDeep with a memory of the Anys it found valid, by content: resources
// share messages (see commonParts), and a shared Any is decoded and validated once. The Anys in
// trusted were packed from typed messages validated before (see packer) and are not decoded.
// Not safe for concurrent use (trusted is only read).
type deepValidator struct {
	valid   packedSet
	trusted packedSets
	buf     []byte
}

// anyKey identifies an Any by content: a SHA-256 of its type URL and bytes.
type anyKey [32]byte

func (v *deepValidator) key(typeURL, value []byte) anyKey {
	// The URL's length first: no two (URL, bytes) pairs hash the same input.
	v.buf = protowire.AppendVarint(v.buf[:0], uint64(len(typeURL)))
	v.buf = append(append(v.buf, typeURL...), value...)
	return sha256.Sum256(v.buf)
}

func (v *deepValidator) remember(k anyKey) {
	if v.valid == nil {
		v.valid = packedSet{}
	}
	v.valid[k] = struct{}{}
}

// validate validates m, whose encoding (any marshaling of m: each field once) is raw.
func (v *deepValidator) validate(m proto.Message, raw []byte) error {
	if va, ok := m.(interface{ ValidateAll() error }); ok {
		if err := va.ValidateAll(); err != nil {
			return err
		}
	}
	if err := v.walk(raw, planOf(m.ProtoReflect().Descriptor())); err != nil {
		return err.flatten()
	}
	return nil
}

// pathError is an error inside an Any with the field path to it, gathered as the walk returns
// (the path is formatted only for an error, not for every field walked).
type pathError struct {
	segs []string // innermost first; "[i]" for list items and map entries
	err  error
}

func (e *pathError) Error() string { return e.flatten().Error() }

func (e *pathError) in(seg string) *pathError {
	e.segs = append(e.segs, seg)
	return e
}

func (e *pathError) flatten() error {
	var b strings.Builder
	for i := len(e.segs) - 1; i >= 0; i-- {
		if s := e.segs[i]; b.Len() > 0 && s[0] != '[' {
			b.WriteByte('.')
		}
		b.WriteString(e.segs[i])
	}
	return fmt.Errorf("%s: %w", b.String(), e.err)
}

// walk reads the encoding b of a message of plan p's type and validates each Any in it.
func (v *deepValidator) walk(b []byte, p *wirePlan) *pathError {
	var seen listCounts
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return &pathError{err: protowire.ParseError(n)}
		}
		b = b[n:]
		f := p.field(num)
		if f == nil || typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return &pathError{err: protowire.ParseError(n)}
			}
			b = b[n:]
			continue
		}
		val, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return &pathError{err: protowire.ParseError(n)}
		}
		b = b[n:]
		if f.fd.IsMap() {
			if err := v.anyOrWalk(mapValue(val), f.plan); err != nil {
				return err.in(fmt.Sprintf("[%v]", mapKey(f.fd, val))).in(f.name)
			}
			continue
		}
		if err := v.anyOrWalk(val, f.plan); err != nil {
			if f.fd.IsList() {
				err.in("[" + strconv.Itoa(seen.get(num)) + "]")
			}
			return err.in(f.name)
		}
		if f.fd.IsList() {
			seen.inc(num)
		}
	}
	return nil
}

// listCounts counts the items of each list field walked so far in one message: a few fields,
// kept on the stack rather than in a map allocated per message.
type listCounts struct {
	nums [4]protowire.Number
	n    [4]int
	more map[protowire.Number]int // past four list fields
}

func (c *listCounts) get(num protowire.Number) int {
	for i, x := range c.nums {
		if x == num {
			return c.n[i]
		}
	}
	return c.more[num]
}

func (c *listCounts) inc(num protowire.Number) {
	for i, x := range c.nums {
		if x == num || x == 0 { // field numbers start at 1: 0 is a free slot
			c.nums[i] = num
			c.n[i]++
			return
		}
	}
	if c.more == nil {
		c.more = map[protowire.Number]int{}
	}
	c.more[num]++
}

func (v *deepValidator) anyOrWalk(b []byte, p *wirePlan) *pathError {
	if !p.isAny {
		return v.walk(b, p)
	}
	var url, value []byte
	for len(b) > 0 { // the last of each field wins, as when decoding
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return &pathError{err: protowire.ParseError(n)}
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			url, n = protowire.ConsumeBytes(b)
		case num == 2 && typ == protowire.BytesType:
			value, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return &pathError{err: protowire.ParseError(n)}
		}
		b = b[n:]
	}
	k := v.key(url, value)
	if _, ok := v.valid[k]; ok || v.trusted.has(k) {
		return nil
	}
	a := &anypb.Any{TypeUrl: string(url), Value: value}
	inner, err := a.UnmarshalNew()
	if err != nil {
		return &pathError{err: fmt.Errorf("cannot decode %s: %v", a.GetTypeUrl(), err)}
	}
	// Walked in its own encoding, each field once (bytes that repeat a field decode merged).
	raw, err := proto.Marshal(inner)
	if err != nil {
		return &pathError{err: fmt.Errorf("cannot encode %s: %v", a.GetTypeUrl(), err)}
	}
	if err := v.validate(inner, raw); err != nil {
		return &pathError{err: err}
	}
	v.remember(k)
	return nil
}

// mapValue is the value (field 2) of a map entry's encoding.
func mapValue(entry []byte) []byte {
	var val []byte
	for len(entry) > 0 {
		num, typ, n := protowire.ConsumeTag(entry)
		if n < 0 {
			break
		}
		entry = entry[n:]
		if num == 2 && typ == protowire.BytesType {
			val, n = protowire.ConsumeBytes(entry)
		} else {
			n = protowire.ConsumeFieldValue(num, typ, entry)
		}
		if n < 0 {
			break
		}
		entry = entry[n:]
	}
	return val
}

// mapKey decodes a map entry's key, for an error's path.
func mapKey(fd protoreflect.FieldDescriptor, entry []byte) any {
	m := dynamicpb.NewMessage(fd.Message())
	if err := proto.Unmarshal(entry, m); err != nil {
		return "?"
	}
	return m.Get(fd.MapKey()).Interface()
}

var anyName = (&anypb.Any{}).ProtoReflect().Descriptor().FullName()

// wirePlan is, for one message type, its fields through which a google.protobuf.Any can be
// reached at any depth: the only fields the walk enters.
type wirePlan struct {
	isAny bool
	small []*wireField // by field number, below len(small)
	large map[protowire.Number]*wireField
}

type wireField struct {
	fd   protoreflect.FieldDescriptor
	name string
	plan *wirePlan // of the field's message (a map's: of its values)
}

func (p *wirePlan) field(num protowire.Number) *wireField {
	if int(num) < len(p.small) {
		return p.small[num]
	}
	return p.large[num]
}

var (
	plans  sync.Map // protoreflect.FullName -> *wirePlan, complete
	planMu sync.Mutex
)

func planOf(md protoreflect.MessageDescriptor) *wirePlan {
	if p, ok := plans.Load(md.FullName()); ok {
		return p.(*wirePlan)
	}
	planMu.Lock()
	defer planMu.Unlock()
	building := map[protoreflect.FullName]*wirePlan{}
	p := buildPlan(md, building, map[protoreflect.FullName]bool{})
	for name, bp := range building { // published once every plan they link to is complete
		plans.Store(name, bp)
	}
	return p
}

func buildPlan(md protoreflect.MessageDescriptor, building map[protoreflect.FullName]*wirePlan, reaches map[protoreflect.FullName]bool) *wirePlan {
	if p, ok := plans.Load(md.FullName()); ok {
		return p.(*wirePlan)
	}
	if p, ok := building[md.FullName()]; ok {
		return p // a recursive type: completed further up
	}
	p := &wirePlan{isAny: md.FullName() == anyName}
	building[md.FullName()] = p
	if p.isAny {
		return p
	}
	fields := md.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		vd := fd
		if fd.IsMap() {
			vd = fd.MapValue()
		}
		if vd.Message() == nil || !reachesAny(vd.Message(), reaches) {
			continue
		}
		f := &wireField{fd: fd, name: string(fd.Name()), plan: buildPlan(vd.Message(), building, reaches)}
		if num := fd.Number(); num < 128 {
			for int(num) >= len(p.small) {
				p.small = append(p.small, nil)
			}
			p.small[num] = f
		} else {
			if p.large == nil {
				p.large = map[protowire.Number]*wireField{}
			}
			p.large[num] = f
		}
	}
	return p
}

// reachesAny says whether a google.protobuf.Any can occur in a message of type md, searching the
// type graph (types can be recursive, e.g. matchers); memo holds the answers found so far.
func reachesAny(md protoreflect.MessageDescriptor, memo map[protoreflect.FullName]bool) bool {
	if r, ok := memo[md.FullName()]; ok {
		return r
	}
	seen := map[protoreflect.FullName]bool{}
	queue := []protoreflect.MessageDescriptor{md}
	found := false
	for len(queue) > 0 && !found {
		d := queue[0]
		queue = queue[1:]
		if d.FullName() == anyName {
			found = true
			break
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
	memo[md.FullName()] = found
	return found
}

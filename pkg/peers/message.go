package peers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// Wire format of every gossip message: one version byte, one type byte, then a JSON body. A
// message is bounded in size before it is decoded, and every entry is checked for shape here and
// for content by the store's validator before it is applied.
const (
	wireVersion byte = 1

	msgDelta byte = 1 // a few changed entries, sent by broadcast
	msgState byte = 2 // every entry, tombstones included, sent by push/pull

	// MaxKeyBytes bounds a key; MaxValueBytes a value; MaxNodeBytes a writer's node name.
	MaxKeyBytes   = 512
	MaxValueBytes = 64 << 10
	MaxNodeBytes  = 128
	// MaxDeltaBytes bounds a delta message (broadcast or reliable send).
	MaxDeltaBytes = MaxValueBytes + 4<<10
	// MaxStateBytes bounds a full state message; memberlist itself refuses push/pull state over
	// 20 MiB, so this is the largest store the fleet can replicate (about 50,000 services).
	MaxStateBytes = 20 << 20
)

// Reasons a message is rejected; they label fwdproxy_gossip_messages_rejected_total.
var (
	ErrOversized = errors.New("message too large")
	ErrVersion   = errors.New("unsupported message version")
	ErrMalformed = errors.New("malformed message")
)

type body struct {
	Entries []Entry `json:"e"`
}

// encodeMessage frames entries as a message of type typ.
func encodeMessage(typ byte, entries []Entry) []byte {
	var buf bytes.Buffer
	buf.WriteByte(wireVersion)
	buf.WriteByte(typ)
	if entries == nil {
		entries = []Entry{}
	}
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // values travel byte for byte
	if err := enc.Encode(body{Entries: entries}); err != nil {
		panic(err) // entries are plain data; encoding cannot fail
	}
	return buf.Bytes()
}

// encodeEntry is one entry as encodeMessage writes it inside a message's list.
func encodeEntry(e *Entry) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(e); err != nil {
		panic(err) // entries are plain data; encoding cannot fail
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// DecodeMessage parses a message no larger than limit and checks the shape of every entry.
func DecodeMessage(b []byte, limit int) (typ byte, entries []Entry, err error) {
	if len(b) > limit {
		return 0, nil, fmt.Errorf("%w: %d bytes, limit %d", ErrOversized, len(b), limit)
	}
	if len(b) < 2 {
		return 0, nil, fmt.Errorf("%w: %d bytes", ErrMalformed, len(b))
	}
	if b[0] != wireVersion {
		return 0, nil, fmt.Errorf("%w %d (this node speaks %d)", ErrVersion, b[0], wireVersion)
	}
	typ = b[1]
	if typ != msgDelta && typ != msgState {
		return 0, nil, fmt.Errorf("%w: unknown type %d", ErrMalformed, typ)
	}
	var m body
	dec := json.NewDecoder(bytes.NewReader(b[2:]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return 0, nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if dec.More() {
		return 0, nil, fmt.Errorf("%w: trailing data", ErrMalformed)
	}
	for i := range m.Entries {
		if err := checkEntry(&m.Entries[i]); err != nil {
			return 0, nil, fmt.Errorf("%w: entry %d: %v", ErrMalformed, i, err)
		}
	}
	return typ, m.Entries, nil
}

func checkKey(k string) error {
	switch {
	case k == "":
		return errors.New("empty key")
	case len(k) > MaxKeyBytes:
		return fmt.Errorf("key of %d bytes, over %d", len(k), MaxKeyBytes)
	case !utf8.ValidString(k):
		return errors.New("key is not UTF-8")
	}
	return nil
}

// checkEntry checks an entry's shape (not its content).
func checkEntry(e *Entry) error {
	if err := checkKey(e.Key); err != nil {
		return err
	}
	switch {
	case e.Node == "" || len(e.Node) > MaxNodeBytes || !utf8.ValidString(e.Node):
		return fmt.Errorf("%s: writer node name missing or invalid", e.Key)
	case e.Time.Wall <= 0:
		return fmt.Errorf("%s: missing timestamp", e.Key)
	case e.Deleted && len(e.Value) > 0:
		return fmt.Errorf("%s: a delete carries a value", e.Key)
	case !e.Deleted && len(e.Value) == 0:
		return fmt.Errorf("%s: no value", e.Key)
	case len(e.Value) > MaxValueBytes:
		return fmt.Errorf("%s: value of %d bytes, over %d", e.Key, len(e.Value), MaxValueBytes)
	}
	return nil
}

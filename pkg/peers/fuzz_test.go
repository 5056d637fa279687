package peers

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// FuzzDecodeMessage: any input either fails to decode or decodes to entries that re-encode to a
// message decoding to the same entries; merging them into a store never panics.
func FuzzDecodeMessage(f *testing.F) {
	v, _ := json.Marshal(svc("reviews.default.svc.cluster.local", 9080))
	now := time.Now().UnixMilli()
	f.Add(encodeMessage(msgDelta, []Entry{{Key: OperatorKey("reviews.default.svc.cluster.local"), Value: v, Time: Timestamp{Wall: now}, Node: "a"}}))
	f.Add(encodeMessage(msgState, []Entry{{Key: OperatorKey("x"), Time: Timestamp{Wall: now, Logical: 3}, Node: "b", Deleted: true}}))
	f.Add(encodeMessage(msgState, nil))
	f.Add([]byte("\x01\x01{\"e\":null}"))
	f.Add([]byte("\x01\x02{\"e\":[{\"k\":\"ready/a\",\"v\":{},\"t\":{\"w\":1},\"n\":\"x\"}]}"))
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		typ, entries, err := DecodeMessage(b, MaxDeltaBytes)
		if err != nil {
			return
		}
		again, entries2, err := DecodeMessage(encodeMessage(typ, entries), MaxDeltaBytes*2)
		if err != nil || again != typ {
			t.Fatalf("re-encoded message does not decode: %v", err)
		}
		if len(entries) != len(entries2) {
			t.Fatalf("entries %d != %d", len(entries), len(entries2))
		}
		for i := range entries {
			a, b := entries[i], entries2[i]
			a.Value, b.Value = compact(a.Value), compact(b.Value)
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("entry %d changed: %+v != %+v", i, a, b)
			}
		}
		s := NewStore("fuzz", CatalogValidator(catalog.Options{}), StoreOptions{})
		s.Merge(entries)
		s.Digest()
	})
}

func compact(v []byte) []byte {
	if len(v) == 0 {
		return nil
	}
	var buf bytes.Buffer
	if json.Compact(&buf, v) != nil {
		return v
	}
	return buf.Bytes()
}

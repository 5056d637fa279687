package dataplane

import (
	"regexp"
	"testing"
)

func TestRequestIDIsRandomUUIDv4(t *testing.T) {
	re := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 100 {
		id := requestID()
		if !re.MatchString(id) {
			t.Fatalf("request id %q is not a version 4 UUID", id)
		}
		if seen[id] {
			t.Fatalf("request id %q repeated", id)
		}
		seen[id] = true
	}
}

package meshtest

import (
	"testing"
	"time"
)

// Eventually polls cond until it holds, failing the test after limit. Counters kept by the
// stand-ins are updated by their own goroutines, often after the client has already seen the
// outcome (a sidecar counts a refused handshake once its alert is sent), so tests that read them
// must wait rather than read once.
func Eventually(tb testing.TB, limit time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting until %s", limit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

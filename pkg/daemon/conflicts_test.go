package daemon

import (
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// TestConflictIsLoggedWhenItAppears: a conflict that lasts is logged once, not at every rebuild;
// a new one is logged, and one that went away and came back is logged again.
func TestConflictIsLoggedWhenItAppears(t *testing.T) {
	logs := &meshtest.SyncBuffer{}
	d := &Daemon{log: slog.New(slog.NewTextHandler(logs, nil))}
	a := errors.New("service a.ns.svc.cluster.local is defined by more than one source")
	b := errors.New("service b.ns.svc.cluster.local is defined by more than one source")
	count := func(err error) int { return strings.Count(logs.String(), err.Error()) }
	steps := []struct {
		conflicts []error
		a, b      int // times logged so far
	}{
		{[]error{a}, 1, 0},
		{[]error{a}, 1, 0},
		{[]error{a, b}, 1, 1},
		{[]error{b, a}, 1, 1},
		{nil, 1, 1},
		{[]error{a, a}, 2, 1},
	}
	for i, s := range steps {
		d.logConflicts(s.conflicts)
		if count(a) != s.a || count(b) != s.b {
			t.Fatalf("after rebuild %d: a logged %d times (want %d), b %d (want %d)\n%s", i+1, count(a), s.a, count(b), s.b, logs.String())
		}
	}
}

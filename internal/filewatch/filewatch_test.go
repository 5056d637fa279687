package filewatch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// startWatch runs Watch on path until stop, returning its callbacks and its events (see
// watchEvent). One watch at a time: the events hook is the package's.
func startWatch(t *testing.T, path string, opts Options) (fired <-chan struct{}, events <-chan string, stop func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	f := make(chan struct{}, 1)
	ev := make(chan string, 64)
	watchEvent = func(e string) {
		select {
		case ev <- e:
		default:
		}
	}
	done := make(chan error, 1)
	go func() {
		done <- Watch(ctx, []string{path}, opts, func() {
			select {
			case f <- struct{}{}:
			default:
			}
		})
	}()
	return f, ev, func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
		watchEvent = nil
	}
}

// await waits (at most 3s) for the watcher's event want.
func await(t *testing.T, events <-chan string, want string) {
	t.Helper()
	timeout := time.After(3 * time.Second)
	for {
		select {
		case e := <-events:
			if e == want {
				return
			}
		case <-timeout:
			t.Fatalf("the watcher did not report %q within 3s", want)
		}
	}
}

// watchOnce reports whether the watcher calls back within 3s, after change (made once it
// watches) if given.
func watchOnce(t *testing.T, path string, opts Options, change func()) bool {
	t.Helper()
	fired, events, stop := startWatch(t, path, opts)
	defer stop()
	if change != nil {
		await(t, events, "watching")
		change()
	}
	select {
	case <-fired:
		return true
	case <-time.After(3 * time.Second):
		return false
	}
}

func TestChangeIsSeen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := Options{Debounce: 10 * time.Millisecond, Poll: time.Hour}
	if !watchOnce(t, path, opts, func() {
		if err := os.WriteFile(path, []byte("b"), 0o644); err != nil {
			t.Fatal(err)
		}
	}) {
		t.Fatal("a write was not seen")
	}
	// Atomic replace by rename, as config tools and Kubernetes do.
	if !watchOnce(t, path, opts, func() {
		if err := os.WriteFile(path+".tmp", []byte("c"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			t.Fatal(err)
		}
	}) {
		t.Fatal("a rename was not seen")
	}
}

func TestChangeBeforeWatchStartsIsSeenWithBaseline(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	base := Take([]string{path})
	if err := os.WriteFile(path, []byte("b"), 0o644); err != nil { // changed after the caller read it, before Watch
		t.Fatal(err)
	}
	if !watchOnce(t, path, Options{Debounce: 10 * time.Millisecond, Poll: time.Hour, Baseline: &base}, nil) {
		t.Fatal("a change made before the watcher started was missed")
	}
	// The comparison with the baseline is made at once; it must not call back.
	same := Take([]string{path})
	fired, events, stop := startWatch(t, path, Options{Debounce: 10 * time.Millisecond, Poll: time.Hour, Baseline: &same})
	defer stop()
	await(t, events, "compared")
	select {
	case <-fired:
		t.Fatal("fired although nothing changed since the baseline")
	default:
	}
}

package filewatch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func watchOnce(t *testing.T, path string, opts Options, change func()) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	fired := make(chan struct{}, 1)
	go Watch(ctx, []string{path}, opts, func() {
		select {
		case fired <- struct{}{}:
		default:
		}
	})
	if change != nil {
		time.Sleep(100 * time.Millisecond) // let the watcher start
		change()
	}
	select {
	case <-fired:
		return true
	case <-ctx.Done():
		return false
	}
}

func TestChangeIsSeen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := Options{Debounce: 10 * time.Millisecond, Poll: time.Hour}
	if !watchOnce(t, path, opts, func() { os.WriteFile(path, []byte("b"), 0o644) }) {
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
	same := Take([]string{path})
	if watchOnce(t, path, Options{Debounce: 10 * time.Millisecond, Poll: time.Hour, Baseline: &same}, nil) {
		t.Fatal("fired although nothing changed since the baseline")
	}
}

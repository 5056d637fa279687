// Package filewatch calls back when any of a set of files changes. It watches the files' parent
// directories (so atomic renames, as Kubernetes and config management tools do, are seen), folds
// bursts of events into one call, and also polls content hashes in case events are missed (NFS,
// some container overlays).
package filewatch

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/fsnotify/fsnotify"
)

// watchEvent, set only by this package's tests, hears "watching" once Watch watches and
// "compared" after each content comparison (and its callback), so tests wait for those rather
// than for time to pass.
var watchEvent func(event string)

func notify(event string) {
	if watchEvent != nil {
		watchEvent(event)
	}
}

// Options tune the watcher; zero values get defaults.
type Options struct {
	Debounce time.Duration // default 200ms
	Poll     time.Duration // default 10s
	// Baseline is the Fingerprint taken before the caller's own first read of the files. A
	// change made between that read and the start of Watch is then not missed. Nil: the
	// contents when Watch starts.
	Baseline *Fingerprint
}

// Fingerprint identifies the contents of a set of files.
type Fingerprint [32]byte

// Take fingerprints paths now.
func Take(paths []string) Fingerprint {
	abs := make([]string, 0, len(paths))
	for _, p := range paths {
		if a, err := filepath.Abs(p); err == nil {
			p = a
		}
		abs = append(abs, p)
	}
	return hashAll(abs)
}

// Watch blocks until ctx is done, calling onChange (never concurrently) after any of paths changed.
func Watch(ctx context.Context, paths []string, opts Options, onChange func()) error {
	if opts.Debounce == 0 {
		opts.Debounce = 200 * time.Millisecond
	}
	if opts.Poll == 0 {
		opts.Poll = 10 * time.Second
	}
	abs := make([]string, 0, len(paths))
	for _, p := range paths {
		a, err := filepath.Abs(p)
		if err != nil {
			return err
		}
		abs = append(abs, a)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	var dirs []string
	for _, p := range abs {
		d := filepath.Dir(p)
		if !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
			if err := w.Add(d); err != nil {
				slog.Warn("file watch unavailable; falling back to polling", "dir", d, "err", err)
			}
		}
	}
	fire := time.NewTimer(time.Hour)
	fire.Stop()
	last := hashAll(abs)
	if opts.Baseline != nil {
		last = *opts.Baseline
		fire.Reset(0) // compare now: the files may have changed since the baseline
	}
	poll := time.NewTicker(opts.Poll)
	defer poll.Stop()
	notify("watching")
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			// Symlink swaps (Kubernetes "..data") change a sibling, so any event in a watched
			// directory is worth a content check.
			_ = ev
			fire.Reset(opts.Debounce)
		case err, ok := <-w.Errors:
			if ok {
				slog.Warn("file watch error", "err", err)
			}
		case <-poll.C:
			fire.Reset(0)
		case <-fire.C:
			if h := hashAll(abs); h != last {
				last = h
				onChange()
			}
			notify("compared")
		}
	}
}

func hashAll(paths []string) Fingerprint {
	h := sha256.New()
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			h.Write([]byte("missing:" + p))
			continue
		}
		h.Write(b)
		h.Write([]byte{0})
	}
	var out Fingerprint
	copy(out[:], h.Sum(nil))
	return out
}

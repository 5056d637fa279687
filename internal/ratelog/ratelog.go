// Package ratelog keeps repeated log lines from flooding the log: the first few of a kind in
// each window are logged, the rest are only counted, and the next line of that kind that is
// logged says how many were left out. Metrics count every event regardless; the log is for
// reading, and garbage sent to a port at line rate must not make it unreadable or fill a disk.
package ratelog

import (
	"sync"
	"time"
)

// Defaults: ten lines of a kind per minute.
const (
	DefaultBurst  = 10
	DefaultWindow = time.Minute
	// maxKeys bounds the kinds remembered; past it every window starts over.
	maxKeys = 1024
)

// Limiter decides which events of each kind (key) are logged. The zero value uses the
// defaults. Safe for concurrent use.
type Limiter struct {
	Burst  int
	Window time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	mu   sync.Mutex
	keys map[string]*window
}

type window struct {
	start      time.Time
	logged     int
	suppressed int
}

// Allow reports whether an event of kind key is logged now, and how many events of that kind
// were left out since the last one logged (to say so on this line).
func (l *Limiter) Allow(key string) (ok bool, suppressed int) {
	burst, span := l.Burst, l.Window
	if burst <= 0 {
		burst = DefaultBurst
	}
	if span <= 0 {
		span = DefaultWindow
	}
	now := time.Now
	if l.Now != nil {
		now = l.Now
	}
	t := now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil || len(l.keys) > maxKeys {
		l.keys = map[string]*window{}
	}
	w := l.keys[key]
	if w == nil || t.Sub(w.start) >= span {
		left := 0
		if w != nil {
			left = w.suppressed
		}
		l.keys[key] = &window{start: t, logged: 1}
		return true, left
	}
	if w.logged < burst {
		w.logged++
		left := w.suppressed
		w.suppressed = 0
		return true, left
	}
	w.suppressed++
	return false, 0
}

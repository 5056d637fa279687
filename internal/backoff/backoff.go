// Package backoff is fwdproxy's one way to wait between retries: exponential, capped and
// jittered delays from apimachinery's wait.Backoff, which never give up (the loops that use it
// retry until their context ends), and can start over after a success.
package backoff

import (
	"context"
	"math"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// Spread is the policy whose delays double from initial up to max, each drawn uniformly from
// [d/2, d) ("equal jitter"): retries from many instances spread out, and no delay exceeds max.
func Spread(initial, max time.Duration) wait.Backoff {
	// wait.Backoff jitters upwards, d + [0, Jitter*d): half the base with Jitter 1 is [d/2, d).
	return wait.Backoff{Duration: initial / 2, Factor: 2, Jitter: 1, Cap: max / 2}
}

// Backoff is one retry loop's state. It is not safe for concurrent use.
type Backoff struct {
	policy, cur wait.Backoff
}

// New starts a backoff with the given policy; its Steps are ignored (it never gives up: Cap
// bounds the delay).
func New(policy wait.Backoff) *Backoff {
	policy.Steps = math.MaxInt32
	return &Backoff{policy: policy, cur: policy}
}

// Next is the delay before the next attempt.
func (b *Backoff) Next() time.Duration { return b.cur.Step() }

// Reset starts over from the first delay (after an attempt that made progress).
func (b *Backoff) Reset() { b.cur = b.policy }

// Sleep waits d or until ctx is done; it reports whether d elapsed.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

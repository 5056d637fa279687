package identity

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/fwdproxy/fwdproxy/internal/backoff"
)

// Rotator renews an identity before it expires. The current bundle keeps serving until Issue
// returns a new, verified one; a failed attempt is retried with exponential backoff and jitter,
// for as long as it takes (past expiry too: the daemon then refuses to use the expired identity
// and says so, see pkg/daemon).
type Rotator struct {
	// Issue obtains a new verified bundle.
	Issue func(context.Context) (*Bundle, error)
	// RenewAt is the fraction of the certificate's lifetime after which it is renewed, e.g. 0.5.
	RenewAt float64
	// Jitter spreads renewals over this fraction of the lifetime, centred on RenewAt, so a fleet
	// whose certificates were issued together does not renew at the same instant.
	Jitter float64
	// Backoff between failed attempts; zero uses 1s doubling to 5m with 20% jitter.
	Backoff wait.Backoff
	// OnRotate receives each new bundle.
	OnRotate func(*Bundle)
	// OnError is told about each failed attempt and when the next one is due.
	OnError func(err error, retryIn time.Duration)
	Log     *slog.Logger
	// Now and Rand default to the real clock and a random source; tests may fix them.
	Now  func() time.Time
	Rand func() float64
}

// RenewalTime is when b should be renewed: NotBefore + lifetime * (RenewAt ± Jitter/2).
func (r *Rotator) RenewalTime(b *Bundle) time.Time {
	nb, na := b.Leaf.NotBefore, b.Leaf.NotAfter
	life := na.Sub(nb)
	rnd := rand.Float64
	if r.Rand != nil {
		rnd = r.Rand
	}
	frac := r.RenewAt + r.Jitter*(rnd()-0.5)
	frac = min(max(frac, 0), 1)
	return nb.Add(time.Duration(float64(life) * frac))
}

func (r *Rotator) backoff() wait.Backoff {
	b := r.Backoff
	if b.Duration <= 0 {
		b = wait.Backoff{Duration: time.Second, Factor: 2, Jitter: 0.2, Cap: 5 * time.Minute}
	}
	return b
}

// Run renews current, and each bundle after it, until ctx is done.
func (r *Rotator) Run(ctx context.Context, current *Bundle) error {
	now := time.Now
	if r.Now != nil {
		now = r.Now
	}
	log := r.Log
	if log == nil {
		log = slog.Default()
	}
	for {
		at := r.RenewalTime(current)
		log.Info("identity renewal scheduled", "identity", current.String(), "renew_at", at.UTC().Format(time.RFC3339))
		if !backoff.Sleep(ctx, at.Sub(now())) {
			return nil
		}
		bo := backoff.New(r.backoff())
		for {
			next, err := r.Issue(ctx)
			if err == nil {
				log.Info("identity renewed", "old", current.String(), "new", next.String())
				current = next
				if r.OnRotate != nil {
					r.OnRotate(next)
				}
				break
			}
			if ctx.Err() != nil {
				return nil
			}
			retry := bo.Next()
			log.Error("identity renewal failed; the current certificate keeps serving", "error", err,
				"retry_in", retry.String(), "current_expires", current.NotAfter().UTC().Format(time.RFC3339))
			if r.OnError != nil {
				r.OnError(err, retry)
			}
			if !backoff.Sleep(ctx, retry) {
				return nil
			}
		}
	}
}

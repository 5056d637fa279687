package identity

import (
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

func waitBackoff(d time.Duration) wait.Backoff {
	return wait.Backoff{Duration: d, Factor: 2, Jitter: 0.1, Cap: 10 * d}
}

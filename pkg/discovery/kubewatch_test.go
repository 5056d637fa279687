package discovery

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/apimachinery/pkg/watch"
	k8stesting "k8s.io/client-go/testing"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// A refused watch (what a down API server gives) is retried inside client-go's reflector and
// never reaches an informer's watch error handler; here it is counted, logged and shown.
func TestKubernetesRefusedWatchIsVisible(t *testing.T) {
	client := bookinfo(t)
	var mu sync.Mutex
	refusing := true
	client.PrependWatchReactor("pods", func(k8stesting.Action) (bool, watch.Interface, error) {
		mu.Lock()
		defer mu.Unlock()
		if refusing {
			return true, nil, fmt.Errorf("dial tcp 127.0.0.1:6443: connect: %w", syscall.ECONNREFUSED)
		}
		return false, nil, nil
	})
	h := newHarness(t, client, func(k *Kubernetes) { k.Namespaces = []string{"bookinfo"} })
	name := h.src.Name()
	errs := func() float64 { return testutil.ToFloat64(h.src.Metrics.syncErrors.WithLabelValues(name)) }
	up := func() float64 { return testutil.ToFloat64(h.src.Metrics.connected.WithLabelValues(name)) }
	// The lists succeeded, so there is a catalog; the pods' watch is refused.
	if c := h.next(); len(c.Services) != 6 {
		t.Fatalf("catalog: %v", hosts(c))
	}
	meshtest.Eventually(t, 10*time.Second, "refused watches counted", func() bool { return errs() >= 2 })
	if up() != 0 {
		t.Errorf("fwdproxy_discovery_connected = %v while a watch is refused", up())
	}
	if st, running := h.src.Status(); !running || st.Connected || !strings.Contains(st.LastError, "connection refused") {
		t.Errorf("status: %+v running=%v", st, running)
	}
	if n := strings.Count(h.logs.String(), "kubernetes list/watch failing"); n != 1 {
		t.Errorf("logged %d times, want once (rate-limited):\n%s", n, h.logs.String())
	}
	mu.Lock()
	refusing = false
	mu.Unlock()
	meshtest.Eventually(t, 10*time.Second, "connected again", func() bool { return up() == 1 })
	if !strings.Contains(h.logs.String(), "reachable again") {
		t.Errorf("recovery not logged:\n%s", h.logs.String())
	}
}

// While the API server is down the reflectors retry at most ~3 s apart, so a change made once it
// is back is seen within 5 s (with the debounce); informers' default backoff grows to 30 s.
func TestKubernetesRetryBackoffBound(t *testing.T) {
	b := kubeBackoff()
	worst := time.Duration(float64(b.Cap) * (1 + b.Jitter))
	if worst+200*time.Millisecond > 5*time.Second {
		t.Errorf("worst retry delay %v plus the default debounce exceeds 5s", worst)
	}
	// The sequence reaches the cap and stays there (never gives up).
	var last time.Duration
	for range 50 {
		last = b.Step()
	}
	if last < b.Cap || last > worst {
		t.Errorf("after 50 steps the delay is %v, want within [%v, %v]", last, b.Cap, worst)
	}
}

// The log of an outage is rate-limited: the first failure at once, then one summary per logEvery.
func TestKubeHealthRateLimitsLogs(t *testing.T) {
	var logs meshtest.SyncBuffer
	now := time.Unix(1000, 0)
	h := newKubeHealth("kubernetes:x", slog.New(slog.NewTextHandler(&logs, nil)), NewSourceMetrics(prometheus.NewRegistry()))
	h.now = func() time.Time { return now }
	h.add("pods")
	ctx := t.Context()
	h.result(ctx, "pods", "watch", nil)
	for i := range 100 {
		now = now.Add(time.Second)
		h.result(ctx, "pods", "watch", fmt.Errorf("refused %d", i))
	}
	// 100 s of failures: the first, then at 30, 60 and 90 s.
	if n := strings.Count(logs.String(), "kubernetes list/watch failing"); n != 4 {
		t.Errorf("%d log lines for 100 failures over 100s, want 4:\n%s", n, logs.String())
	}
	if got := testutil.ToFloat64(h.metrics.syncErrors.WithLabelValues("kubernetes:x")); got != 100 {
		t.Errorf("counted %v, want 100", got)
	}
}

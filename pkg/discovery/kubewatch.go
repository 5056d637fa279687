package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// Each watched resource is a client-go Reflector feeding an Indexer, rather than a shared
// informer, for two things informers do not offer: its list and watch calls go through
// kubeHealth (a refused watch is retried inside the reflector and never reaches an informer's
// watch error handler, so an API server outage would go unseen), and a short retry backoff
// (informers back off up to 30 s, so a change made after an outage took as long to be served).

// kubeBackoff paces list/watch retries while the API server is unreachable: at most about 3 s
// (2 s cap, 50% jitter) between attempts, so a change made once it is back is served within 5 s.
func kubeBackoff() *wait.Backoff {
	return &wait.Backoff{Duration: 250 * time.Millisecond, Factor: 2, Jitter: 0.5, Steps: 10, Cap: 2 * time.Second}
}

// kubeWatch is one watched resource (one kind in one namespace).
type kubeWatch struct {
	name      string
	store     *notifyStore
	reflector *cache.Reflector
}

// newKubeWatch builds the reflector for lw; changed is called after every change to the store.
func newKubeWatch(name string, lw *cache.ListWatch, client any, example runtime.Object, transform cache.TransformFunc, health *kubeHealth, changed func()) *kubeWatch {
	store := &notifyStore{
		Indexer:   cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}),
		transform: transform,
		changed:   changed,
	}
	health.add(name)
	tracked := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			obj, err := lw.ListWithContextFunc(ctx, o)
			health.result(ctx, name, "list", err)
			return obj, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := lw.WatchFuncWithContext(ctx, o)
			health.result(ctx, name, "watch", err)
			return w, err
		},
	}
	r := cache.NewReflectorWithOptions(cache.ToListWatcherWithWatchListSemantics(tracked, client), example, store,
		cache.ReflectorOptions{Name: name, Backoff: kubeBackoff()})
	return &kubeWatch{name: name, store: store, reflector: r}
}

func (w *kubeWatch) hasSynced() bool { return w.store.synced.Load() }

// notifyStore is an Indexer that applies a transform to what it stores, reports every change
// and remembers whether it has had its first complete list.
type notifyStore struct {
	cache.Indexer
	transform cache.TransformFunc
	changed   func()
	synced    atomic.Bool
}

// Transformer lets the reflector slim objects already in the watch-list's temporary store, so
// the initial sync never holds whole pods either.
func (s *notifyStore) Transformer() cache.TransformFunc { return s.transform }

func (s *notifyStore) tr(obj any) any {
	if s.transform == nil {
		return obj
	}
	if out, err := s.transform(obj); err == nil {
		return out
	}
	return obj
}

func (s *notifyStore) Add(obj any) error {
	err := s.Indexer.Add(s.tr(obj))
	s.changed()
	return err
}

func (s *notifyStore) Update(obj any) error {
	err := s.Indexer.Update(s.tr(obj))
	s.changed()
	return err
}

func (s *notifyStore) Delete(obj any) error {
	err := s.Indexer.Delete(obj)
	s.changed()
	return err
}

func (s *notifyStore) Replace(list []any, rv string) error {
	for i := range list {
		list[i] = s.tr(list[i])
	}
	err := s.Indexer.Replace(list, rv)
	s.synced.Store(true)
	s.changed()
	return err
}

func (s *notifyStore) Resync() error { return nil }

// kubeHealth follows whether a cluster's list/watch calls succeed: failures are counted in
// fwdproxy_discovery_sync_errors_total and logged (the first of an outage at once, then a
// summary at most every logEvery), and fwdproxy_discovery_connected says whether every watch
// has an open stream, with fwdproxy_discovery_connected_since_timestamp_seconds saying since when.
type kubeHealth struct {
	source   string
	log      *slog.Logger
	metrics  *SourceMetrics
	logEvery time.Duration
	now      func() time.Time

	mu        sync.Mutex
	up        map[string]bool // watch name -> its last list/watch call succeeded
	connected bool
	since     time.Time
	lastErr   string
	failures  int // since the last log line
	lastLog   time.Time
	onChange  func()
}

func newKubeHealth(source string, log *slog.Logger, m *SourceMetrics) *kubeHealth {
	h := &kubeHealth{source: source, log: log, metrics: m, logEvery: 30 * time.Second, now: time.Now, up: map[string]bool{}}
	h.since = h.now()
	h.metrics.setConnected(source, false, h.since)
	return h
}

func (h *kubeHealth) add(name string) {
	h.mu.Lock()
	h.up[name] = false
	h.mu.Unlock()
}

// ignorable errors are the reflector's normal restarts and shutdown, not outages.
func ignorable(ctx context.Context, err error) bool {
	return ctx.Err() != nil || errors.Is(err, context.Canceled) || apierrors.IsResourceExpired(err) || apierrors.IsGone(err)
}

// result records the outcome of one list or watch call.
func (h *kubeHealth) result(ctx context.Context, name, verb string, err error) {
	if err != nil && ignorable(ctx, err) {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	if err != nil {
		h.metrics.syncError(h.source)
		h.up[name] = false
		h.failures++
		h.lastErr = fmt.Sprintf("%s %s: %v", verb, name, err)
		if h.connected || h.lastLog.IsZero() || now.Sub(h.lastLog) >= h.logEvery {
			h.log.Error("kubernetes list/watch failing; retrying, the last catalog stays in force",
				"error", h.lastErr, "failures", h.failures, "disconnectedSince", h.sinceIfDown(now))
			h.failures = 0
			h.lastLog = now
		}
	} else {
		h.up[name] = true
	}
	all := true
	for _, ok := range h.up {
		all = all && ok
	}
	if all == h.connected {
		return
	}
	h.connected, h.since = all, now
	h.metrics.setConnected(h.source, all, now)
	if all {
		if !h.lastLog.IsZero() {
			h.log.Info("kubernetes API server reachable again; watches connected", "failuresSinceLastLog", h.failures)
		}
		h.failures = 0
		h.lastLog = time.Time{}
	}
	if h.onChange != nil {
		h.onChange()
	}
}

func (h *kubeHealth) sinceIfDown(now time.Time) string {
	if h.connected {
		return now.UTC().Format(time.RFC3339)
	}
	return h.since.UTC().Format(time.RFC3339)
}

// KubeStatus is a cluster's connection state, for `fwdproxy status`.
type KubeStatus struct {
	Source    string    `json:"source"`
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since"`
	LastError string    `json:"lastError,omitempty"`
}

func (h *kubeHealth) status() KubeStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := KubeStatus{Source: h.source, Connected: h.connected, Since: h.since}
	if !h.connected {
		st.LastError = h.lastErr
	}
	return st
}

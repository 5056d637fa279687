package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/fwdproxy/fwdproxy/internal/backoff"
	"github.com/fwdproxy/fwdproxy/internal/filewatch"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// Expired identity: the mesh rejects an expired certificate, so rather than let every request
// fail one TLS handshake at a time, the daemon stops offering the services at all. While the
// identity is expired it
//   - publishes a snapshot with no listeners, clusters or secrets (withholdIfExpired, called by
//     rebuild), so the data plane refuses connections instead of forwarding them,
//   - reports not ready on /ready, so the load balancer sends the traffic to healthy instances,
//   - logs an error every minute and sets fwdproxy_identity_expired to 1.
// A renewed identity restores the normal snapshot at once.

// identityMetrics are the rotation metrics; fwdproxy_identity_expiry_timestamp_seconds is in
// daemon.go.
type identityMetrics struct {
	rotations      prometheus.Counter
	rotationErrors prometheus.Counter
	expired        prometheus.Gauge
	// changed wakes watchExpiry when a new identity is set.
	changed chan struct{}
}

// setIdentity hands a new identity to the daemon and re-evaluates its expiry.
func (d *Daemon) setIdentity(m *identityMetrics, b *identity.Bundle) {
	d.SetIdentity(b)
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

func (d *Daemon) identityMetrics() *identityMetrics {
	m := &identityMetrics{
		rotations: registerOrReuse(d.Registry, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fwdproxy_identity_rotations_total", Help: "Identity certificates replaced by a newer verified one."})),
		rotationErrors: registerOrReuse(d.Registry, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fwdproxy_identity_rotation_errors_total", Help: "Failed attempts to obtain or load a new identity certificate."})),
		expired: registerOrReuse(d.Registry, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fwdproxy_identity_expired", Help: "1 while the fleet identity is expired and no upstream traffic is served."})),
		changed: make(chan struct{}, 1),
	}
	return m
}

func registerOrReuse[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(err)
	}
	return c
}

// identitySource loads the first identity and returns a function that keeps it current until ctx
// ends, calling SetIdentity on every valid change. A rejected change leaves the last good
// identity. The source is identity.files or identity.acmpca.
func (d *Daemon) identitySource() (*identity.Bundle, func(context.Context) error, error) {
	m := d.identityMetrics()
	var (
		bundle *identity.Bundle
		keep   func(context.Context) error
		err    error
	)
	if a := d.cfg.Identity.ACMPCA; a != nil {
		bundle, keep, err = d.acmpcaIdentity(a, m)
	} else {
		bundle, keep, err = d.fileIdentity(m)
	}
	if err != nil {
		return nil, nil, err
	}
	return bundle, func(ctx context.Context) error {
		g, ctx := errgroup.WithContext(ctx)
		g.Go(func() error { return keep(ctx) })
		g.Go(func() error { return d.watchExpiry(ctx, m, time.Minute) })
		return g.Wait()
	}, nil
}

func (d *Daemon) fileIdentity(m *identityMetrics) (*identity.Bundle, func(context.Context) error, error) {
	f := d.cfg.Identity.Files
	files := identity.Files{
		SPIFFEID:   d.cfg.Identity.SPIFFEID,
		CertChain:  d.cfg.Path(f.CertChain),
		PrivateKey: d.cfg.Path(f.PrivateKey),
		Roots:      d.cfg.Path(f.Roots),
	}
	base := filewatch.Take(files.Paths())
	bundle, err := files.Load()
	if err != nil {
		return nil, nil, err
	}
	watch := func(ctx context.Context) error {
		return filewatch.Watch(ctx, files.Paths(), filewatch.Options{Baseline: &base}, func() {
			b, err := files.Load()
			if err != nil {
				m.rotationErrors.Inc()
				d.log.Error("identity files rejected; still serving the last good identity", "error", err)
				return
			}
			if cur := d.currentIdentity(); cur == nil || cur.Fingerprint() != b.Fingerprint() {
				m.rotations.Inc()
			}
			d.setIdentity(m, b)
		})
	}
	return bundle, watch, nil
}

// acmpcaIdentity issues the first certificate (or reuses a persisted one that is not yet due for
// renewal), bounded by issueTimeout, and returns the rotation loop.
func (d *Daemon) acmpcaIdentity(a *config.ACMPCAIdentity, m *identityMetrics) (*identity.Bundle, func(context.Context) error, error) {
	ctx, cancel := context.WithTimeout(context.Background(), a.IssueTimeout)
	defer cancel()
	client, err := identity.NewACMPCAClient(ctx, a.Region, a.Endpoint)
	if err != nil {
		return nil, nil, fmt.Errorf("identity.acmpca: %w", err)
	}
	issuer := &identity.ACMPCA{
		Client:                  client,
		CertificateAuthorityARN: a.CertificateAuthorityARN,
		SPIFFEID:                d.cfg.Identity.SPIFFEID,
		SigningAlgorithm:        a.SigningAlgorithm,
		TemplateARN:             a.TemplateARN,
		Validity:                a.Validity,
		KeyAlgorithm:            a.KeyAlgorithm,
		MaxWait:                 a.IssueTimeout,
	}
	if a.Roots != "" {
		path := d.cfg.Path(a.Roots)
		issuer.Roots = func() ([]byte, error) { return os.ReadFile(path) }
	}
	log := d.log.With("component", "identity", "ca", a.CertificateAuthorityARN)
	persistDir := d.cfg.Path(a.PersistDir)
	rot := &identity.Rotator{
		Issue:   issuer.Issue,
		RenewAt: a.RenewAt,
		Jitter:  *a.Jitter,
		Log:     log,
		OnRotate: func(b *identity.Bundle) {
			if persistDir != "" {
				if err := identity.Persist(persistDir, b); err != nil {
					log.Error("cannot persist the renewed identity; it is served from memory", "error", err)
				}
			}
			m.rotations.Inc()
			d.setIdentity(m, b)
		},
		OnError: func(error, time.Duration) { m.rotationErrors.Inc() },
	}

	var bundle *identity.Bundle
	if persistDir != "" {
		if b, err := identity.PersistedFiles(persistDir, d.cfg.Identity.SPIFFEID).Load(); err == nil && time.Now().Before(rot.RenewalTime(b)) {
			log.Info("reusing the persisted identity", "identity", b.String(), "dir", persistDir)
			bundle = b
		}
	}
	if bundle == nil {
		bo := backoff.New(wait.Backoff{Duration: time.Second, Factor: 2, Jitter: 0.2, Cap: 30 * time.Second})
		for {
			bundle, err = issuer.Issue(ctx)
			if err == nil {
				break
			}
			m.rotationErrors.Inc()
			retry := bo.Next()
			log.Error("cannot obtain the identity from ACM PCA; retrying", "error", err, "retry_in", retry.String())
			select {
			case <-ctx.Done():
				return nil, nil, fmt.Errorf("identity.acmpca: no certificate within issueTimeout %s: %w", a.IssueTimeout, err)
			case <-time.After(retry):
			}
		}
		if persistDir != "" {
			if err := identity.Persist(persistDir, bundle); err != nil {
				return nil, nil, fmt.Errorf("identity.acmpca.persistDir: %w", err)
			}
		}
	}
	return bundle, func(ctx context.Context) error { return rot.Run(ctx, bundle) }, nil
}

func (d *Daemon) currentIdentity() *identity.Bundle {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.bundle
}

// withholdIfExpired replaces the inputs with an empty catalog and no identity while the identity
// is expired (see the comment at the top of this file).
func (d *Daemon) withholdIfExpired(cat *catalog.Catalog, b *identity.Bundle) (*catalog.Catalog, *identity.Bundle) {
	if b != nil && b.Expired(time.Now()) {
		return &catalog.Catalog{}, nil
	}
	return cat, b
}

// watchExpiry rebuilds the configuration when the identity expires and logs an error every
// interval while it stays expired.
func (d *Daemon) watchExpiry(ctx context.Context, m *identityMetrics, interval time.Duration) error {
	wasExpired := false
	for {
		b := d.currentIdentity()
		next := interval
		expired := b != nil && b.Expired(time.Now())
		if expired {
			m.expired.Set(1)
			d.log.Error("IDENTITY EXPIRED: serving no upstream traffic and reporting not ready until a valid certificate is loaded",
				"identity", b.String(), "expired_for", time.Since(b.NotAfter()).Round(time.Second).String())
		} else {
			m.expired.Set(0)
			if b != nil {
				next = min(interval, time.Until(b.NotAfter())+time.Millisecond)
			}
		}
		if expired != wasExpired {
			d.poke()
		}
		wasExpired = expired
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(next):
		case <-m.changed:
		}
	}
}

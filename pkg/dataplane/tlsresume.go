package dataplane

import (
	"crypto/tls"
	"sync"
)

// sessionCache keeps an upstream cluster's TLS sessions for resumption (max_session_keys) while
// the client certificate and trust bundle they were made with are current: as Envoy rebuilds its
// TLS context (and drops its sessions) on an SDS update, a rotated certificate or bundle is used
// by the very next connection, never skipped by resuming an older session.
type sessionCache struct {
	dp    *DataPlane
	spec  *tlsSpec
	inner tls.ClientSessionCache
	mu    sync.Mutex
	cert  *secret // the secrets of the moment the cached sessions were made
	roots *secret
}

func newSessionCache(dp *DataPlane, spec *tlsSpec) *sessionCache {
	return &sessionCache{dp: dp, spec: spec, inner: tls.NewLRUClientSessionCache(spec.sessionKeys)}
}

func (c *sessionCache) current() (cert, roots *secret) {
	if c.spec.certSecret != "" {
		cert = c.dp.secret(c.spec.certSecret)
	}
	if c.spec.rootsSecret != "" {
		roots = c.dp.secret(c.spec.rootsSecret)
	}
	return cert, roots
}

func (c *sessionCache) Get(key string) (*tls.ClientSessionState, bool) {
	cert, roots := c.current()
	c.mu.Lock()
	defer c.mu.Unlock()
	if cert != c.cert || roots != c.roots {
		return nil, false
	}
	return c.inner.Get(key)
}

func (c *sessionCache) Put(key string, cs *tls.ClientSessionState) {
	cert, roots := c.current()
	c.mu.Lock()
	defer c.mu.Unlock()
	if cert != c.cert || roots != c.roots {
		c.inner = tls.NewLRUClientSessionCache(c.spec.sessionKeys) // forget the older sessions
		c.cert, c.roots = cert, roots
	}
	c.inner.Put(key, cs)
}

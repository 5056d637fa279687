package dataplane

import (
	"crypto/tls"
	"sync"
)

// sessionCaches keeps an upstream cluster's TLS sessions for resumption (max_session_keys) while
// the client certificate and trust bundle they were made with are current: as Envoy rebuilds its
// TLS context (and drops its sessions) on an SDS update, a rotated certificate or bundle is used
// by the very next connection, never skipped by resuming an older session.
//
// Each handshake is given the cache of the secrets current when it starts, not one shared cache
// checked on Put: a TLS 1.3 ticket arrives after the handshake (often on the first read), so a
// Put tagged at that moment could file a session made with the old certificate under the new
// one, and every later resumption would present the old identity again. A session stored late
// lands in its own generation's cache, which the next rotation discards.
type sessionCaches struct {
	dp   *DataPlane
	spec *tlsSpec

	mu    sync.Mutex
	cert  *secret // the secrets of the current generation
	roots *secret
	cache tls.ClientSessionCache
}

func newSessionCaches(dp *DataPlane, spec *tlsSpec) *sessionCaches {
	return &sessionCaches{dp: dp, spec: spec}
}

// current returns the session cache of the secrets of the moment, starting an empty one when
// they have rotated since the last handshake.
func (c *sessionCaches) current() tls.ClientSessionCache {
	var cert, roots *secret
	if c.spec.certSecret != "" {
		cert = c.dp.secret(c.spec.certSecret)
	}
	if c.spec.rootsSecret != "" {
		roots = c.dp.secret(c.spec.rootsSecret)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cache == nil || cert != c.cert || roots != c.roots {
		c.cache = tls.NewLRUClientSessionCache(c.spec.sessionKeys) // forget the older sessions
		c.cert, c.roots = cert, roots
	}
	return c.cache
}

// handshakeConfig is the cluster's TLS config for one new connection: with resumption on, a
// shallow copy bound to the current generation's session cache.
func (rt *clusterRuntime) handshakeConfig() *tls.Config {
	if rt.sessions == nil {
		return rt.tls
	}
	cfg := rt.tls.Clone()
	cfg.ClientSessionCache = rt.sessions.current()
	return cfg
}

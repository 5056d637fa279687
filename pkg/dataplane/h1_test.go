package dataplane

import (
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// Keep-alive requests reuse one upstream mTLS connection instead of handshaking again.
func TestKeepAliveReusesUpstreamConnection(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), nil)
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	defer c.CloseIdleConnections()
	for i := range 20 {
		resp := get(t, c, port, svc.Host, "/again")
		if got := body(t, resp); resp.StatusCode != 200 || got != "hello /again " {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, got)
		}
	}
	if n := mesh.handshakes(); n != 1 {
		t.Errorf("20 sequential requests made %d upstream handshakes, want 1", n)
	}
	if n := counter(t, e.dp.metrics.requests.WithLabelValues(controlplane.ClusterName(port, "", svc.Host), "200")); n != 20 {
		t.Errorf("requests_total{code=200} = %v, want 20", n)
	}
}

// A pooled upstream connection the server closed while idle is replaced without failing the
// request.
func TestIdleUpstreamClosedByServerIsReplaced(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), nil)
	c := &http.Client{}
	defer c.CloseIdleConnections()
	// The answer promises keep-alive, then the server closes the connection.
	if resp := get(t, c, port, svc.Host, "/then-close"); resp.StatusCode != 200 {
		t.Fatalf("first request: %d", resp.StatusCode)
	} else if got := body(t, resp); got != "bye\n" {
		t.Fatalf("first request: %q", got)
	}
	for i := range 3 {
		resp := get(t, c, port, svc.Host, "/two")
		if got := body(t, resp); resp.StatusCode != 200 || got != "hello /two " {
			t.Fatalf("request %d after the server closed the idle connection: %d %q", i, resp.StatusCode, got)
		}
	}
	if n := mesh.handshakes(); n != 2 {
		t.Errorf("%d upstream handshakes, want 2 (the first connection, then its replacement)", n)
	}
}

func TestH1PoolReuseExpiryAndClose(t *testing.T) {
	var p h1Pool
	conn := func() (*h1Conn, net.Conn) {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		return newH1Conn(a), b
	}
	now := time.Now()
	if p.get("a:1", now) != nil {
		t.Fatal("empty pool returned a connection")
	}
	c1, _ := conn()
	c2, _ := conn()
	p.put("a:1", c1)
	p.put("a:1", c2)
	if got := p.get("b:1", now); got != nil {
		t.Fatal("connection of another endpoint returned")
	}
	if got := p.get("a:1", time.Now()); got != c2 {
		t.Fatal("want the most recently used connection first")
	}
	// c1 has been idle too long by then: closed, not returned.
	if got := p.get("a:1", time.Now().Add(h1IdleTimeout+time.Second)); got != nil {
		t.Fatal("expired connection returned")
	}
	if _, err := c1.conn.Write([]byte("x")); err == nil {
		t.Error("expired connection was not closed")
	}
	// prune closes what expired and keeps the rest.
	c3, _ := conn()
	c4, _ := conn()
	p.put("a:1", c3)
	p.put("a:1", c4)
	c3.idleSince = time.Now().Add(-h1IdleTimeout - time.Second)
	p.prune(time.Now())
	if got := p.get("a:1", time.Now()); got != c4 {
		t.Fatal("prune dropped a fresh connection")
	}
	if got := p.get("a:1", time.Now()); got != nil {
		t.Fatal("prune kept an expired connection")
	}
	// After closeIdle (the config changed), returned connections are closed.
	c5, _ := conn()
	p.closeIdle()
	p.put("a:1", c5)
	if got := p.get("a:1", time.Now()); got != nil {
		t.Fatal("closed pool kept a connection")
	}
	if _, err := c5.conn.Write([]byte("x")); err == nil {
		t.Error("connection returned to a closed pool was not closed")
	}
}

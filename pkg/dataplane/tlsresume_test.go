package dataplane

import (
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// As Envoy (max_session_keys 1), a new upstream connection resumes the cluster's last TLS
// session rather than doing a full handshake, until the client certificate rotates: the next
// connection then presents the new one in a full handshake.
func TestUpstreamTLSSessionsResumeUntilTheCertificateRotates(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	port := freePort(t)
	cat := &catalog.Catalog{Services: []catalog.Service{reviews(port, catalog.TCP)}}
	e.pushApplied(cat, e.options(mesh.addr), nil)
	exchange := func(i int) {
		c := dialTCP(t, port)
		c.line(t) // the server spoke, so its session ticket has been read too
		c.ping(t, fmt.Sprintf("conn %d", i))
		c.Close()
	}
	for i := range 3 {
		exchange(i)
	}
	if n := mesh.resumed.Load(); n != 2 {
		t.Fatalf("3 connections resumed %d TLS sessions, want 2 (all but the first)", n)
	}
	mesh.mu.Lock()
	first := mesh.clients[0].SerialNumber
	mesh.mu.Unlock()

	e.bundle = e.issueFleet() // a new fleet certificate over SDS
	e.pushApplied(cat, e.options(mesh.addr), nil)
	exchange(3)
	if n := mesh.resumed.Load(); n != 2 {
		t.Errorf("the connection after the rotation resumed an older session (%d resumed)", n)
	}
	mesh.mu.Lock()
	last := mesh.clients[len(mesh.clients)-1].SerialNumber
	mesh.mu.Unlock()
	if last.Cmp(first) == 0 {
		t.Error("the connection after the rotation presented the old certificate")
	}
	exchange(4)
	if n := mesh.resumed.Load(); n != 3 {
		t.Errorf("after the rotation, the next connection did not resume the new session (%d resumed, want 3)", n)
	}
}

// A TLS 1.3 ticket is stored after its handshake, often on the first read: one that arrives
// after the certificate rotated must not be resumed by the connections after the rotation,
// which would present the old identity again.
func TestLateSessionTicketIsNotResumedAfterRotation(t *testing.T) {
	dp := &DataPlane{}
	secrets := map[string]*secret{"cert": {}}
	dp.secrets.Store(&secrets)
	caches := newSessionCaches(dp, &tlsSpec{certSecret: "cert", sessionKeys: 1})

	before := caches.current() // a handshake starts with the first certificate
	rotated := map[string]*secret{"cert": {}}
	dp.secrets.Store(&rotated)
	late, err := tls.NewResumptionState([]byte("ticket"), &tls.SessionState{})
	if err != nil {
		t.Fatal(err)
	}
	before.Put("mesh:15443", late) // its ticket arrives after the rotation

	after := caches.current()
	if _, ok := after.Get("mesh:15443"); ok {
		t.Fatal("a session made with the old certificate is resumed after the rotation")
	}
	after.Put("mesh:15443", late)
	if _, ok := caches.current().Get("mesh:15443"); !ok {
		t.Fatal("a session of the current certificate is not kept for resumption")
	}
}

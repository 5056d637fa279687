package localsock

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

func TestMain(m *testing.M) {
	meshtest.RunHelper(map[string]func([]string) int{"connect": connectHelper})
	os.Exit(m.Run())
}

// connectHelper connects to the socket args[0] and prints what the server said.
func connectHelper(args []string) int {
	c, err := net.DialTimeout("unix", args[0], 5*time.Second)
	if err != nil {
		fmt.Println("connect:", err)
		return 1
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if string(b) != "ok" {
		fmt.Printf("refused: read %q, %v\n", b, err)
		return 3
	}
	fmt.Println("ok")
	return 0
}

// serve answers "ok" on every connection the guard lets through and records the refused.
func serve(t *testing.T, l net.Listener, p Policy) *refusals {
	t.Helper()
	r := &refusals{}
	g := Guard(l, p, func(c Cred, err error) {
		r.mu.Lock()
		r.creds = append(r.creds, c)
		r.errs = append(r.errs, err)
		r.mu.Unlock()
	})
	go func() {
		for {
			c, err := g.Accept()
			if err != nil {
				return
			}
			if lc, ok := c.(*Conn); !ok || !lc.Known {
				t.Errorf("accepted %T without credentials", c)
			}
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return r
}

type refusals struct {
	mu    sync.Mutex
	creds []Cred
	errs  []error
}

func (r *refusals) last() (Cred, int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.creds) == 0 {
		return Cred{}, 0, nil
	}
	return r.creds[len(r.creds)-1], len(r.creds), r.errs[len(r.errs)-1]
}

func TestListenPermissions(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run", "fwdproxy")
	path := filepath.Join(dir, "xds.sock")
	l, err := Listen(path, -1)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v %v: want a socket with mode 0600 without a group", fi.Mode(), err)
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o755 {
		t.Errorf("created directory mode %v, want 0755", di.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %v, want only the socket (no temporary name left)", entries)
	}
	if _, err := Listen(path, -1); err == nil || !strings.Contains(err.Error(), "served by another process") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}

	// A stale socket (its server died without removing it) is replaced; a group gets 0660.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	l, err = Listen(path, Nobody)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	defer l.Close()
	fi, _ = os.Lstat(path)
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o660 || st.Gid != Nobody {
		t.Fatalf("socket with a group: mode %v gid %d, want 0660 gid %d", fi.Mode().Perm(), st.Gid, Nobody)
	}

	// Where others can write the directory, they could put their own socket in its place.
	open := t.TempDir()
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(filepath.Join(open, "xds.sock"), -1); err == nil || !strings.Contains(err.Error(), "writable by other users") {
		t.Fatalf("in a world-writable directory: %v", err)
	}
	if _, err := Listen(filepath.Join(t.TempDir(), strings.Repeat("x", MaxPath)), -1); err == nil {
		t.Fatal("accepted a path over the limit")
	}
	notSock := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notSock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(notSock, -1); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("over a regular file: %v", err)
	}
}

const Nobody = meshtest.Nobody

// TestOtherUserRefused connects as nobody (uid 65534): the socket's mode keeps it out; with the
// mode loosened the peer-credential check still refuses it; with its group allowed it gets in.
func TestOtherUserRefused(t *testing.T) {
	dir := meshtest.SharedDir(t)
	path := filepath.Join(dir, "guarded.sock")
	l, err := Listen(path, -1)
	if err != nil {
		t.Fatal(err)
	}
	r := serve(t, l, Policy{UID: uint32(os.Geteuid()), GID: -1, Field: "test.group"})

	// The daemon's own user is let through.
	if out := connectHelper([]string{path}); out != 0 {
		t.Fatal("the daemon's own user was refused")
	}
	out, err := meshtest.AsUser(t, Nobody, Nobody, "connect", path)
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("nobody with the socket mode 0600: %v\n%s", err, out)
	}

	// Even when the file lets it through, the credentials do not.
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err = meshtest.AsUser(t, Nobody, Nobody, "connect", path)
	if err == nil || strings.Contains(out, "ok") {
		t.Fatalf("nobody with the socket mode 0666 was served: %v\n%s", err, out)
	}
	cred, n, why := r.last()
	if n != 1 || cred.UID != Nobody || cred.GID != Nobody || cred.PID <= 0 || why == nil ||
		!strings.Contains(why.Error(), "nobody is not root or the daemon's user") || !strings.Contains(why.Error(), "test.group") {
		t.Fatalf("refusals %d, last %v: %v", n, cred, why)
	}

	// The group the policy names gets in (by its primary group here).
	l2, err := Listen(filepath.Join(dir, "group.sock"), Nobody)
	if err != nil {
		t.Fatal(err)
	}
	serve(t, l2, Policy{UID: uint32(os.Geteuid()), GID: Nobody, Field: "test.group"})
	if out, err := meshtest.AsUser(t, Nobody, Nobody, "connect", filepath.Join(dir, "group.sock")); err != nil || !strings.Contains(out, "ok") {
		t.Fatalf("nobody in the allowed group: %v\n%s", err, out)
	}
}

func TestPolicy(t *testing.T) {
	p := Policy{UID: 1000, GID: 998, Field: "xds.group"}
	for _, c := range []struct {
		cred Cred
		ok   bool
	}{
		{Cred{UID: 0, GID: 0}, true},
		{Cred{UID: 1000, GID: 1000}, true},
		{Cred{UID: 998, GID: 998}, true},
		{Cred{UID: 1001, GID: 1001, Groups: []uint32{27, 998}}, true},
		{Cred{UID: 1001, GID: 1001, Groups: []uint32{27}}, false},
		{Cred{UID: Nobody, GID: Nobody}, false},
	} {
		if err := p.Allows(c.cred); (err == nil) != c.ok {
			t.Errorf("%v: %v, want allowed %v", c.cred, err, c.ok)
		}
	}
	if err := (Policy{UID: 1000, GID: -1}).Allows(Cred{UID: 998, GID: 998}); err == nil {
		t.Error("without a group, another user is allowed")
	}
}

func TestLookupGroup(t *testing.T) {
	for name, want := range map[string]int{"": -1, "998": 998, "nogroup": Nobody} {
		if got, err := LookupGroup(name); err != nil || got != want {
			t.Errorf("LookupGroup(%q) = %d, %v; want %d", name, got, err, want)
		}
	}
	if _, err := LookupGroup("no-such-group-here"); err == nil || err.Error() != `no group "no-such-group-here" on this host` {
		t.Errorf("an unknown group: %v", err)
	}
}

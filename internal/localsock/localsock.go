// Package localsock serves on Unix domain sockets that only chosen local users reach: the socket
// file's owner, group and mode admit them (like Docker's /var/run/docker.sock), and every
// connection's peer credentials, as the kernel recorded them at connect, are checked again, so a
// socket whose mode was loosened by mistake still refuses everyone else.
//
// The daemon's xDS/SDS socket (it hands out the fleet's private key) and its admin socket (it
// changes the whole fleet's configuration) both use it.
package localsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"time"
)

// MaxPath bounds a socket's path: the kernel's limit (sun_path) is 107 bytes on Linux and 103 on
// BSDs, and Listen binds first under a slightly longer temporary name.
const MaxPath = 90

// ErrUnsupported is returned by PeerCred where the platform records no peer credentials.
var ErrUnsupported = errors.New("peer credentials are not available on this platform")

// Cred is a connecting process's identity as the kernel recorded it when it connected.
type Cred struct {
	UID, GID uint32
	// PID is the connecting process, 0 when unknown.
	PID int32
	// Groups are its supplementary groups, nil when the platform does not report them.
	Groups []uint32
}

// String names the peer for logs: "uid 65534 (nobody) gid 65534 pid 4711".
func (c Cred) String() string {
	s := "uid " + strconv.FormatUint(uint64(c.UID), 10)
	if name := UserName(c.UID); name != "" {
		s += " (" + name + ")"
	}
	s += " gid " + strconv.FormatUint(uint64(c.GID), 10)
	if c.PID > 0 {
		s += " pid " + strconv.FormatInt(int64(c.PID), 10)
	}
	return s
}

// Principal is the user a caller authenticated as: its user name, or uid N without one.
func (c Cred) Principal() string {
	if name := UserName(c.UID); name != "" {
		return name
	}
	return "uid " + strconv.FormatUint(uint64(c.UID), 10)
}

// UserName is the name of uid, or "" when it has none here.
func UserName(uid uint32) string {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return ""
	}
	return u.Username
}

// Policy says who may use a socket: root (which can read every key on the host anyway), the
// daemon's own user (its supervised Envoy, its CLI run as that user) and, when GID is set, the
// processes in that group, by primary or supplementary group.
type Policy struct {
	// UID is the daemon's own effective user.
	UID uint32
	// GID is the group allowed besides; -1 for none.
	GID int
	// Field names the config field that sets the group, for messages (e.g. "xds.group").
	Field string
}

// Allows reports nil when c may use the socket, otherwise why not.
func (p Policy) Allows(c Cred) error {
	if c.UID == 0 || c.UID == p.UID {
		return nil
	}
	if p.GID >= 0 && (c.GID == uint32(p.GID) || slices.Contains(c.Groups, uint32(p.GID))) {
		return nil
	}
	who := "root or the daemon's user (" + Cred{UID: p.UID}.Principal() + ")"
	if p.GID >= 0 {
		return fmt.Errorf("%s is not %s, nor in group %s (%s)", Cred{UID: c.UID}.Principal(), who, GroupName(p.GID), p.Field)
	}
	return fmt.Errorf("%s is not %s; set %s to let a group in", Cred{UID: c.UID}.Principal(), who, p.Field)
}

// GroupName names gid for messages: "envoy (gid 998)".
func GroupName(gid int) string {
	s := "gid " + strconv.Itoa(gid)
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		return g.Name + " (" + s + ")"
	}
	return s
}

// LookupGroup resolves a group given by name or number; "" is no group (-1).
func LookupGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	var unknown user.UnknownGroupError
	if errors.As(err, &unknown) {
		return -1, fmt.Errorf("no group %q on this host", name)
	}
	if err != nil {
		return -1, fmt.Errorf("group %q: %w", name, err)
	}
	return strconv.Atoi(g.Gid)
}

// Mode is the socket file's mode: read-write for its owner, and for its group when there is one.
func Mode(gid int) os.FileMode {
	if gid >= 0 {
		return 0o660
	}
	return 0o600
}

// Listen serves a Unix socket at path, owned by the daemon's user and group gid (-1: the
// daemon's own group) with Mode(gid). A missing directory is created (0755: the socket's own
// mode guards it); a directory that other users can write is refused, since they could replace
// the socket with their own. A stale socket left by a previous run is replaced; a socket that a
// live process serves is an error. The socket is bound under a private temporary name and
// renamed into place once its owner and mode are set, so it is never reachable with looser
// permissions. Closing the listener removes the socket.
func Listen(path string, gid int) (net.Listener, error) {
	if len(path) > MaxPath {
		return nil, fmt.Errorf("socket path %s is %d bytes, over the limit of %d", path, len(path), MaxPath)
	}
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		if err := os.Chmod(dir, 0o755); err != nil { // MkdirAll's mode is subject to the umask
			return nil, err
		}
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket; remove it or choose another path", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is served by another process (another fwdproxy daemon?)", path)
		}
	}
	return listen(path, gid)
}

// listener removes its socket when closed, if the socket is still the one it bound.
type listener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo
}

func (l *listener) Close() error {
	err := l.UnixListener.Close()
	if fi, serr := os.Lstat(l.path); serr == nil && os.SameFile(fi, l.fi) {
		_ = os.Remove(l.path)
	}
	return err
}

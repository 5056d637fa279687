package localsock

import (
	"errors"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PeerCred reads the credentials of the process at the other end of a Unix socket connection:
// SO_PEERCRED (user, group, process) and SO_PEERGROUPS (supplementary groups, Linux 4.13+).
func PeerCred(c net.Conn) (Cred, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return Cred{}, errors.New("not a socket connection")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var cred Cred
	var credErr error
	err = raw.Control(func(fd uintptr) {
		var uc *unix.Ucred
		if uc, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); credErr != nil {
			return
		}
		cred = Cred{UID: uc.Uid, GID: uc.Gid, PID: uc.Pid}
		cred.Groups = peerGroups(int(fd))
	})
	if err == nil {
		err = credErr
	}
	return cred, err
}

// peerGroups returns the peer's supplementary groups, or nil where the kernel has no
// SO_PEERGROUPS.
func peerGroups(fd int) []uint32 {
	buf := make([]uint32, 32)
	for range 3 {
		n := uint32(len(buf) * 4) // socklen_t
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case e == unix.ERANGE && int(n/4) > len(buf):
			buf = make([]uint32, n/4)
		case e != 0:
			return nil
		default:
			return buf[:n/4]
		}
	}
	return nil
}

package localsock

import (
	"errors"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// PeerCred reads the credentials of the process at the other end of a Unix socket connection
// (LOCAL_PEERCRED, LOCAL_PEERPID).
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
		var xu *unix.Xucred
		if xu, credErr = unix.GetsockoptXucred(int(fd), unix.SOL_LOCAL, unix.LOCAL_PEERCRED); credErr != nil {
			return
		}
		cred.UID = xu.Uid
		if xu.Ngroups > 0 {
			cred.GID = xu.Groups[0]
			cred.Groups = append([]uint32(nil), xu.Groups[:xu.Ngroups]...)
		}
		if pid, err := unix.GetsockoptInt(int(fd), unix.SOL_LOCAL, unix.LOCAL_PEERPID); err == nil {
			cred.PID = int32(pid)
		}
	})
	if err == nil {
		err = credErr
	}
	return cred, err
}

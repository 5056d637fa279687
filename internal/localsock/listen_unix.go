//go:build unix

package localsock

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
)

// checkDir refuses a directory that another non-root user owns or can write.
func checkDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("directory %s is writable by other users (mode %v), who could replace the socket with their own; use a directory only the daemon's user can write, such as /run/fwdproxy", dir, fi.Mode().Perm())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("directory %s belongs to %s, who could replace the socket with their own; use a directory of the daemon's user or root, such as /run/fwdproxy", dir, Cred{UID: st.Uid}.Principal())
	}
	return nil
}

func listen(path string, gid int) (net.Listener, error) {
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".s")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	bound := filepath.Join(tmp, "s")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: bound, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ul.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		ul.Close()
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(bound, -1, gid); err != nil {
			return fail(fmt.Errorf("give the socket to %s: %w (the daemon's user must be a member of the group, e.g. SupplementaryGroups= in its systemd unit)", GroupName(gid), err))
		}
	}
	if err := os.Chmod(bound, Mode(gid)); err != nil {
		return fail(err)
	}
	if err := os.Rename(bound, path); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &listener{UnixListener: ul, path: path, fi: fi}, nil
}

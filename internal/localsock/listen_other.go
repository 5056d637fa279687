//go:build !unix

package localsock

import (
	"net"
	"os"
)

// checkDir: this platform's file permissions are not Unix modes; the directory is the
// operator's to protect.
func checkDir(string) error { return nil }

func listen(path string, gid int) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ul.SetUnlinkOnClose(false)
	fi, err := os.Lstat(path)
	if err != nil {
		ul.Close()
		return nil, err
	}
	return &listener{UnixListener: ul, path: path, fi: fi}, nil
}

package meshtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
)

// LookPath finds a system binary, or says how to install it.
func LookPath(binary, aptPackage string) (string, error) {
	p, err := exec.LookPath(binary)
	if err != nil {
		for _, dir := range []string{"/usr/sbin", "/sbin"} { // not on every user's PATH
			if c := filepath.Join(dir, binary); isExecutable(c) {
				return c, nil
			}
		}
		return "", fmt.Errorf("%s not found on PATH: install it with `apt-get install -y %s`", binary, aptPackage)
	}
	return p, nil
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// FreePort returns a loopback TCP port that was free a moment ago, for processes that need a
// port number in their config file. It never returns the same port twice in one process, so
// ports picked one after the other for one scenario do not collide.
func FreePort() (int, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !portsGiven[p] {
			portsGiven[p] = true
			return p, nil
		}
	}
	return 0, errors.New("meshtest: no unused loopback port found in 100 tries")
}

// FreeAddr is "127.0.0.1:PORT" for a free port.
func FreeAddr() (string, error) {
	p, err := FreePort()
	if err != nil {
		return "", err
	}
	return "127.0.0.1:" + strconv.Itoa(p), nil
}

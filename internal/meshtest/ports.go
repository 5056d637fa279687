package meshtest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
// ports picked one after the other for one scenario do not collide. Ports come from below the
// kernel's ephemeral range: a port the kernel hands out for port 0 may meanwhile become the
// local end of some outgoing connection, and another test process asking for port 0 would get
// ports from that range too.
func FreePort() (int, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	lo, hi := 10000, ephemeralStart()-1
	for range 1000 {
		p := lo + rand.IntN(hi-lo+1)
		if portsGiven[p] {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		l.Close()
		portsGiven[p] = true
		return p, nil
	}
	return 0, errors.New("meshtest: no unused loopback port found in 1000 tries")
}

// ephemeralStart is the first port of the kernel's ephemeral range (Linux's default 32768).
func ephemeralStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if f := strings.Fields(string(b)); err == nil && len(f) == 2 {
		if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
			return n
		}
	}
	return 32768
}

// FreeAddr is "127.0.0.1:PORT" for a free port.
func FreeAddr() (string, error) {
	p, err := FreePort()
	if err != nil {
		return "", err
	}
	return "127.0.0.1:" + strconv.Itoa(p), nil
}

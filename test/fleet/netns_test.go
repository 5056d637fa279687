//go:build linux

package fleet_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nsPrefix marks every namespace and host-side interface this suite creates, followed by the
// creating process's pid in hex, so a later run can remove what a killed run left behind.
const nsPrefix = "fwfl"

// ip runs iproute2's ip with args.
func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// removeLeftovers deletes the namespaces (and with them their veths) and the host-side
// interfaces of earlier runs whose process is gone, killing what still runs inside them.
func removeLeftovers() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		if owner, ok := ownerPID(name); ok && !alive(owner) {
			killNamespace(name)
			_ = ip("netns", "delete", name)
		}
	}
	out, _ = exec.Command("ip", "-o", "link", "show").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if owner, ok := ownerPID(name); ok && !alive(owner) {
			_ = ip("link", "delete", name)
		}
	}
}

// ownerPID parses "fwfl<hexpid>[-role]".
func ownerPID(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, nsPrefix)
	if !ok {
		return 0, false
	}
	hex, _, _ := strings.Cut(rest, "-")
	pid, err := strconv.ParseInt(hex, 16, 32)
	return int(pid), err == nil && pid > 0
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil || pid == os.Getpid() }

// killNamespace SIGKILLs every process in namespace ns: an instance's host dying at once.
func killNamespace(ns string) {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// lan is the test's network: a bridge in its own namespace, one namespace per host joined to it
// by a veth pair, and the test process itself (which runs the mesh stand-ins) on the host side
// of one more veth. Addresses are 10.X.Y.0/24 with X.Y from the pid, so concurrent runs differ.
type lan struct {
	t      testing.TB
	id     string // nsPrefix + pid in hex
	hub    string
	subnet [3]byte
	hostIP string
}

func newLAN(t testing.TB) *lan {
	pid := os.Getpid()
	l := &lan{t: t, id: fmt.Sprintf("%s%x", nsPrefix, pid)}
	l.subnet = [3]byte{10, byte(100 + pid%100), byte(pid / 100 % 250)}
	l.hub = l.id + "-hub"
	l.hostIP = l.addr(1)
	t.Cleanup(func() {
		killNamespace(l.hub)
		_ = ip("netns", "delete", l.hub) // takes the bridge, every hub-side veth and the host one
		_ = ip("link", "delete", l.id)
	})
	l.must("netns", "add", l.hub)
	l.must("-n", l.hub, "link", "add", "br0", "type", "bridge")
	l.must("-n", l.hub, "link", "set", "br0", "up")
	l.must("link", "add", l.id, "type", "veth", "peer", "name", "v-host", "netns", l.hub)
	l.must("-n", l.hub, "link", "set", "v-host", "master", "br0", "up")
	l.must("addr", "add", l.hostIP+"/24", "dev", l.id)
	l.must("link", "set", l.id, "up")
	return l
}

func (l *lan) must(args ...string) {
	l.t.Helper()
	if err := ip(args...); err != nil {
		l.t.Fatal(err)
	}
}

func (l *lan) addr(host int) string {
	return fmt.Sprintf("%d.%d.%d.%d", l.subnet[0], l.subnet[1], l.subnet[2], host)
}

// host is one namespace on the LAN.
type host struct {
	l    *lan
	name string // namespace
	role string
	ip   string
}

// addHost creates namespace role with address .n on the LAN; t.Cleanup kills what runs in it
// and removes it.
func (l *lan) addHost(role string, n int) *host {
	h := &host{l: l, name: l.id + "-" + role, role: role, ip: l.addr(n)}
	l.t.Cleanup(func() {
		killNamespace(h.name)
		_ = ip("netns", "delete", h.name)
	})
	l.must("netns", "add", h.name)
	l.must("-n", l.hub, "link", "add", "v-"+role, "type", "veth", "peer", "name", "eth0", "netns", h.name)
	l.must("-n", l.hub, "link", "set", "v-"+role, "master", "br0", "up")
	l.must("-n", h.name, "addr", "add", h.ip+"/24", "dev", "eth0")
	l.must("-n", h.name, "link", "set", "eth0", "up")
	l.must("-n", h.name, "link", "set", "lo", "up")
	return h
}

// cutFrom makes h unable to exchange packets with the others (both directions are cut, since
// each side's route is prohibited); heal restores them.
func (h *host) cutFrom(others ...*host) error {
	for _, o := range others {
		if err := ip("-n", h.name, "route", "add", "prohibit", o.ip+"/32"); err != nil {
			return err
		}
		if err := ip("-n", o.name, "route", "add", "prohibit", h.ip+"/32"); err != nil {
			return err
		}
	}
	return nil
}

func (h *host) heal(others ...*host) error {
	var first error
	for _, o := range others {
		for _, e := range []error{
			ip("-n", h.name, "route", "del", "prohibit", o.ip+"/32"),
			ip("-n", o.name, "route", "del", "prohibit", h.ip+"/32"),
		} {
			if e != nil && first == nil {
				first = e
			}
		}
	}
	return first
}

// command runs bin in h's namespace.
func (h *host) command(bin string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.name, bin}, args...)...)
}

// dial connects from inside h's namespace: the socket is created on an OS thread switched into
// the namespace (it stays there), then the thread is switched back.
func (h *host) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + h.name)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("setns %s: %w", h.name, err)}
			return
		}
		c, err := (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
		// A thread that cannot go back stays locked, so Go ends it with this goroutine.
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

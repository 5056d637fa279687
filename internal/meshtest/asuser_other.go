//go:build !linux

package meshtest

import "testing"

// AsUser needs Linux (a child process with another uid); the test fails elsewhere.
func AsUser(t testing.TB, uid, gid uint32, name string, args ...string) (string, error) {
	t.Helper()
	t.Fatal("this test runs a client as another uid, which needs Linux and root")
	return "", nil
}

// SharedDir needs Linux, like AsUser.
func SharedDir(t testing.TB) string {
	t.Helper()
	t.Fatal("this test needs Linux and root")
	return ""
}

// RunAs needs Linux, like AsUser.
func RunAs(t testing.TB, uid, gid uint32, env []string, bin string, args ...string) (string, error) {
	t.Helper()
	t.Fatal("this test runs a program as another uid, which needs Linux and root")
	return "", nil
}

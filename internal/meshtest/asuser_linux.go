package meshtest

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// AsUser runs helper name of this test binary (see RunHelper) as uid:gid, with no
// supplementary groups, and returns its combined output and exit error. The binary is linked
// (or copied) into a directory every user can read, since the build directory is private. It
// needs root: the test fails saying so otherwise.
func AsUser(t testing.TB, uid, gid uint32, name string, args ...string) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test runs a client as uid %d to show other local users are refused: run it as root (CI does)", uid)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := SharedDir(t)
	bin := filepath.Join(dir, filepath.Base(exe))
	if err := os.Link(exe, bin); err != nil {
		if err := copyFile(exe, bin); err != nil {
			t.Fatal(err)
		}
	}
	return RunAs(t, uid, gid, []string{helperEnv + "=" + name}, bin, args...)
}

// RunAs runs the program bin (which uid must be able to execute) as uid:gid, with no
// supplementary groups and only env and PATH in its environment, for at most 30 s, and returns
// its combined output and exit error. It needs root, like AsUser.
func RunAs(t testing.TB, uid, gid uint32, env []string, bin string, args ...string) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test runs a client as uid %d to show other local users are refused: run it as root (CI does)", uid)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append([]string{"PATH=/usr/bin:/bin"}, env...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// SharedDir is a temporary directory (removed when the test ends) that every local user can
// enter and read but only root can write, like /run/fwdproxy on an instance.
func SharedDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fwdproxy-shared-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

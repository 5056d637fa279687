//go:build unix

package dataplane

import "syscall"

// fileLimit is the process's limit on open file descriptors (Go raises the soft limit to the
// hard one at start), or 0 when it cannot be read.
func fileLimit() int {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0
	}
	return int(min(r.Cur, 1<<30))
}

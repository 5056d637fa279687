//go:build !linux && !darwin

package localsock

import "net"

// PeerCred is not available here: the socket file's permissions alone admit callers.
func PeerCred(net.Conn) (Cred, error) { return Cred{}, ErrUnsupported }

package localsock

import (
	"errors"
	"net"
)

// Conn is a connection accepted by a Guard listener, with its peer's credentials.
type Conn struct {
	net.Conn
	Cred Cred
	// Known is false where the platform reports no credentials (ErrUnsupported): the socket
	// file's permissions alone admitted the caller.
	Known bool
}

// Guard returns a listener that accepts only the connections p allows; each refused one is
// passed to refused (for a log line) and closed before anything is read or written on it.
func Guard(l net.Listener, p Policy, refused func(Cred, error)) net.Listener {
	return &guard{Listener: l, p: p, refused: refused}
}

type guard struct {
	net.Listener
	p       Policy
	refused func(Cred, error)
}

func (g *guard) Accept() (net.Conn, error) {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := PeerCred(c)
		switch {
		case errors.Is(err, ErrUnsupported):
			return &Conn{Conn: c}, nil
		case err == nil:
			err = g.p.Allows(cred)
		}
		if err != nil {
			if g.refused != nil {
				g.refused(cred, err)
			}
			c.Close()
			continue
		}
		return &Conn{Conn: c, Cred: cred, Known: true}, nil
	}
}

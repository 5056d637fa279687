package daemon

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"

	"golang.org/x/sync/errgroup"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/tlsfiles"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// xdsListeners are where the xDS/SDS server is reachable. Each authenticates its callers, since
// SDS hands out the fleet's private key: the Unix socket by the socket file's mode and the
// peer's credentials, the in-process listener by being reachable only from this process (the
// built-in data plane), the optional TCP listener by client certificates.
type xdsListeners struct {
	socket     net.Listener
	policy     localsock.Policy
	socketPath string
	tcp        net.Listener
	tls        *tls.Config
}

// listenXDS opens the xDS listeners of the config (before anything else starts, so a socket
// that cannot be created stops the daemon with the reason).
func (d *Daemon) listenXDS() (*xdsListeners, error) {
	x := d.cfg.XDS
	gid, err := localsock.LookupGroup(x.Group)
	if err != nil {
		return nil, fmt.Errorf("xds.group: %w", err)
	}
	l := &xdsListeners{socketPath: d.cfg.XDSSocket(), policy: localsock.Policy{UID: uint32(os.Geteuid()), GID: gid, Field: "xds.group"}}
	if l.socket, err = localsock.Listen(l.socketPath, gid); err != nil {
		return nil, fmt.Errorf("xds.socket: %w", err)
	}
	if x.Address != "" {
		t := x.TLS
		if t == nil { // validation refuses this; never serve the key on TCP without client certificates
			l.close()
			return nil, fmt.Errorf("xds.address %s needs xds.tls (client certificates)", x.Address)
		}
		if l.tls, err = tlsfiles.Server(d.cfg.Path(t.CertChain), d.cfg.Path(t.PrivateKey), d.cfg.Path(t.ClientCA)); err != nil {
			l.close()
			return nil, fmt.Errorf("xds.tls: %w", err)
		}
		if l.tcp, err = net.Listen("tcp", x.Address); err != nil {
			l.close()
			return nil, fmt.Errorf("xds.address: %w", err)
		}
	}
	if d.cfg.Dataplane == "builtin" {
		d.inproc = controlplane.NewInProcessListener()
	}
	d.envoyUID = uint32(os.Geteuid())
	d.XDS.SetDataPlane(d.isDataPlane)
	return l, nil
}

func (l *xdsListeners) close() {
	if l.socket != nil {
		l.socket.Close()
	}
	if l.tcp != nil {
		l.tcp.Close()
	}
}

func (l *xdsListeners) serve(ctx context.Context, g *errgroup.Group, d *Daemon) {
	g.Go(func() error { return d.XDS.ServeUnix(ctx, l.socket, l.policy) })
	if d.inproc != nil {
		g.Go(func() error { return d.XDS.ServeInProcess(ctx, d.inproc) })
	}
	if l.tcp != nil {
		g.Go(func() error { return d.XDS.ServeTLS(ctx, l.tcp, l.tls) })
	}
}

func (l *xdsListeners) describe() string {
	s := "unix:" + l.socketPath
	if l.tcp != nil {
		s += " tcp:" + l.tcp.Addr().String() + " (client certificates)"
	}
	return s
}

// isDataPlane says whether an xDS client is this instance's own data plane, the one /ready and
// the NACK alert are about: it names the node ID the daemon gave it (Envoy's bootstrap, the
// built-in data plane's options) and comes the way that data plane comes. The built-in data
// plane connects in process; a supervised Envoy on the socket as the daemon's own user; with
// dataplane: none, the data plane on this host (systemd's Envoy, fwdproxy dataplane) on the
// socket. Any other client (another node ID, a TCP client on another host) is served but says
// nothing about whether this instance carries traffic.
func (d *Daemon) isDataPlane(c controlplane.Client) bool {
	if c.Node != d.cfg.Node.ID {
		return false
	}
	switch d.cfg.Dataplane {
	case "builtin":
		return c.Peer.Transport == controlplane.InProcess
	case "envoy":
		return c.Peer.Transport == controlplane.UnixSocket && (!c.Peer.CredKnown || c.Peer.Cred.UID == d.envoyUID)
	}
	return c.Peer.Transport == controlplane.UnixSocket
}

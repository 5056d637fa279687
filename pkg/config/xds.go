package config

import (
	"path/filepath"
	"regexp"
	"strings"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
)

// XDS is the data plane's ADS and SDS server. SDS carries the fleet's private key, so nothing
// that serves it is reachable by a caller that has not authenticated, on loopback included: the
// Unix socket admits root, the daemon's own user and Group (by the socket file's mode and by the
// connecting process's credentials), and the optional TCP address requires a client
// certificate signed by TLS.ClientCA. The built-in data plane needs neither: it runs in the
// daemon and takes its configuration in process.
type XDS struct {
	// Socket is the Unix socket a data plane on this host connects to (Envoy's bootstrap, fwdproxy
	// dataplane --xds); default /run/fwdproxy/xds.sock.
	Socket string `yaml:"socket"`
	// Group (a name or a number) may connect besides root and the daemon's user: the data plane's
	// group, e.g. envoy. The socket is then 0660 and belongs to it (the daemon's user must be a
	// member); without a group it is 0600.
	Group string `yaml:"group"`
	// Address also serves xDS on TCP (host:port), for data planes on other hosts. It requires TLS.
	Address string `yaml:"address"`
	// TLS is the TCP server's certificate and the CA its clients' certificates must chain to.
	TLS *ServerTLS `yaml:"tls"`
}

// ServerTLS is a server certificate and the CA of the client certificates it accepts.
type ServerTLS struct {
	CertChain  string `yaml:"certChain"`
	PrivateKey string `yaml:"privateKey"`
	ClientCA   string `yaml:"clientCA"`
}

// Default sockets, in the directory the machine image's systemd unit creates (RuntimeDirectory).
const (
	DefaultXDSSocket   = "/run/fwdproxy/xds.sock"
	DefaultAdminSocket = "/run/fwdproxy/admin.sock"
)

func (c *Config) xdsDefaults() {
	if c.XDS.Socket == "" {
		c.XDS.Socket = DefaultXDSSocket
	}
}

// SocketPath resolves a socket path from the config: absolute, relative to the config file.
func (c *Config) SocketPath(p string) string {
	p = c.Path(p)
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// XDSSocket is the xDS socket's absolute path.
func (c *Config) XDSSocket() string { return c.SocketPath(c.XDS.Socket) }

var groupName = regexp.MustCompile(`^([a-z_][a-z0-9_.-]*\$?|[0-9]+)$`)

// socketProblems checks a socket path and its group.
func (c *Config) socketProblems(p *problems, field, path, group string) {
	switch abs := c.SocketPath(path); {
	case strings.HasSuffix(path, "/"):
		p.Addf(field+".socket", "%q is a directory; name the socket file, e.g. %s", path, filepath.Join(path, filepath.Base(field)+".sock"))
	case len(abs) > localsock.MaxPath:
		p.Addf(field+".socket", "%s is %d bytes long; Unix socket paths are limited, keep it within %d (e.g. /run/fwdproxy/%s.sock)", abs, len(abs), localsock.MaxPath, field)
	}
	if group != "" && !groupName.MatchString(group) {
		p.Addf(field+".group", "%q is not a group name or number (e.g. envoy, or 998)", group)
	}
}

// tlsProblems checks a TLS block's files.
func tlsProblems(p *problems, field string, t *ServerTLS) {
	if t == nil {
		return
	}
	for _, f := range []struct{ field, path string }{{"certChain", t.CertChain}, {"privateKey", t.PrivateKey}, {"clientCA", t.ClientCA}} {
		if f.path == "" {
			p.Addf(field+".tls."+f.field, "required with %s.tls: path to a PEM file", field)
		}
	}
}

func (c *Config) xdsProblems(p *problems) {
	x := c.XDS
	c.socketProblems(p, "xds", x.Socket, x.Group)
	switch {
	case x.Address != "" && checkHostPort(x.Address) != nil:
		p.Addf("xds.address", "%v", checkHostPort(x.Address))
	case x.Address != "" && x.TLS == nil:
		p.Addf("xds.address", "%q would hand the fleet's private key (SDS) to whoever connects over TCP, loopback included (any local user); remove xds.address so data planes on this host use the Unix socket xds.socket (%s), or set xds.tls {certChain, privateKey, clientCA} to require client certificates", x.Address, x.Socket)
	case x.Address == "" && x.TLS != nil:
		p.Addf("xds.tls", "set without xds.address; add the TCP address to serve with client certificates (e.g. 0.0.0.0:18000), or remove xds.tls")
	}
	tlsProblems(p, "xds", x.TLS)
}

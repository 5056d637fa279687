package config

// Admin is the fleet admin API used by fwdproxy apply, delete and status. It changes the
// configuration of every instance, so every caller authenticates, on loopback included: on the
// Unix socket by the socket file's mode and the connecting process's credentials (root, the
// daemon's user and Group), on the optional TCP address by a bearer token or a client
// certificate.
type Admin struct {
	// Socket is the admin API's Unix socket; default /run/fwdproxy/admin.sock. The CLI's verbs
	// use it by default.
	Socket string `yaml:"socket"`
	// Group (a name or a number) may use the socket besides root and the daemon's user: the
	// operators' group, e.g. fwdproxy-admin. The socket is then 0660 and belongs to it (the
	// daemon's user must be a member); without a group it is 0600.
	Group string `yaml:"group"`
	// Address also serves the admin API on TCP (host:port), e.g. for operators elsewhere. It
	// requires tokenFile or tls, whatever the address.
	Address string `yaml:"address"`
	// TokenFile holds the bearer tokens TCP clients send (Authorization: Bearer TOKEN): one per
	// line, "NAME TOKEN" (the name appears in the audit log) or just "TOKEN" (named default).
	TokenFile string `yaml:"tokenFile"`
	// TLS serves the TCP address over TLS and requires client certificates signed by clientCA.
	TLS *AdminTLS `yaml:"tls"`
}

// AdminTLS is the admin API's server certificate and the CA of allowed client certificates.
type AdminTLS = ServerTLS

func (c *Config) adminDefaults() {
	if c.Admin.Socket == "" {
		c.Admin.Socket = DefaultAdminSocket
	}
}

// AdminSocket is the admin socket's absolute path.
func (c *Config) AdminSocket() string { return c.SocketPath(c.Admin.Socket) }

func (c *Config) adminProblems(p *problems) {
	a := c.Admin
	c.socketProblems(p, "admin", a.Socket, a.Group)
	if c.AdminSocket() == c.XDSSocket() {
		p.Addf("admin.socket", "%s is also xds.socket; give each its own path", a.Socket)
	}
	switch {
	case a.Address != "" && checkHostPort(a.Address) != nil:
		p.Addf("admin.address", "%v", checkHostPort(a.Address))
	case a.Address != "" && a.TokenFile == "" && a.TLS == nil:
		p.Addf("admin.address", "%q would let whoever connects over TCP change the whole fleet, loopback included (any local user); set admin.tokenFile (bearer tokens) or admin.tls (client certificates), or remove admin.address and use the Unix socket admin.socket (%s), which fwdproxy apply, delete and status use by default", a.Address, a.Socket)
	case a.Address == "" && (a.TokenFile != "" || a.TLS != nil):
		p.Addf("admin.address", "required with admin.tokenFile or admin.tls: they authenticate TCP callers (e.g. 0.0.0.0:9180); the Unix socket admin.socket authenticates by user")
	}
	tlsProblems(p, "admin", a.TLS)
}

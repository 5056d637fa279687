package config

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Envoy configures a supervised Envoy process (dataplane: envoy). The daemon writes Envoy's
// bootstrap (pointing at the daemon's own xDS server), starts `envoy -c BOOTSTRAP
// --drain-time-s N ARGS...`, restarts it with backoff when it exits, and on shutdown drains its
// listeners before forwarding SIGTERM.
type Envoy struct {
	// Binary is the envoy executable: a path, or a name looked up in PATH.
	Binary string `yaml:"binary"`
	// AdminAddress is Envoy's admin listener; default 127.0.0.1:15000. Keep it on loopback.
	AdminAddress string `yaml:"adminAddress"`
	// BootstrapPath is where the daemon writes Envoy's bootstrap; default
	// $TMPDIR/fwdproxy-envoy-<node.id>.json.
	BootstrapPath string `yaml:"bootstrapPath"`
	// DrainTime is how long Envoy drains its listeners on shutdown (--drain-time-s); default 30s.
	DrainTime time.Duration `yaml:"drainTime"`
	// Args are extra command-line arguments, e.g. ["--concurrency", "2"].
	Args []string `yaml:"args"`
	// XDSProtocol is how Envoy's bootstrap subscribes: delta (default; a change sends only the
	// changed resources) or sotw (state of the world: every resource of a changed type).
	XDSProtocol string `yaml:"xdsProtocol"`
}

// Builtin tunes the built-in data plane (dataplane: builtin).
type Builtin struct {
	// DrainTime bounds how long listeners removed from the configuration, and all listeners at
	// shutdown, wait for open connections before closing them; default 30s.
	DrainTime time.Duration `yaml:"drainTime"`
}

func (c *Config) dataplaneDefaults() {
	if c.Envoy.AdminAddress == "" {
		c.Envoy.AdminAddress = "127.0.0.1:15000"
	}
	if c.Dataplane == "" {
		c.Dataplane = "builtin"
		if c.Envoy.Binary != "" {
			c.Dataplane = "envoy"
		}
	}
	if c.Envoy.BootstrapPath == "" {
		c.Envoy.BootstrapPath = filepath.Join(os.TempDir(), "fwdproxy-envoy-"+safeFileName(c.Node.ID)+".json")
	}
	if c.Envoy.XDSProtocol == "" {
		c.Envoy.XDSProtocol = "delta"
	}
	if c.Envoy.DrainTime == 0 {
		c.Envoy.DrainTime = 30 * time.Second
	}
	if c.Builtin.DrainTime == 0 {
		c.Builtin.DrainTime = 30 * time.Second
	}
}

// safeFileName keeps a node ID usable as part of a file name.
func safeFileName(s string) string {
	if s == "" {
		return "node"
	}
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
			return r
		}
		return '_'
	}, s)
}

func (c *Config) dataplaneProblems(p *problems) {
	if err := checkHostPort(c.Envoy.AdminAddress); err != nil {
		p.Addf("envoy.adminAddress", "%v", err)
	} else if host, _, _ := net.SplitHostPort(c.Envoy.AdminAddress); host != "" && !isIP(host) {
		// Envoy binds its admin address without resolving names.
		p.Addf("envoy.adminAddress", "%q: Envoy needs an IP address there, such as 127.0.0.1:15000", c.Envoy.AdminAddress)
	} else if !isLoopbackAddr(c.Envoy.AdminAddress) {
		// Envoy's admin has no authentication and can stop Envoy, drain it or dump its config.
		p.Addf("envoy.adminAddress", "%q is not a loopback address; Envoy's admin API is unauthenticated, keep it on 127.0.0.1 (e.g. 127.0.0.1:15000)", c.Envoy.AdminAddress)
	}
	switch c.Dataplane {
	case "builtin", "none":
	case "envoy":
		if c.Envoy.Binary == "" {
			p.Addf("envoy.binary", "required with dataplane: envoy: the path of the envoy executable")
		}
	default:
		p.Addf("dataplane", "%q is not a data plane; use builtin or envoy (or none: serve xDS only, data planes run elsewhere)", c.Dataplane)
	}
	if c.Envoy.XDSProtocol != "delta" && c.Envoy.XDSProtocol != "sotw" {
		p.Addf("envoy.xdsProtocol", "%q is not an xDS protocol; use delta (the default) or sotw", c.Envoy.XDSProtocol)
	}
	if c.Envoy.DrainTime < 0 {
		p.Addf("envoy.drainTime", "%v is negative; use a duration such as 30s", c.Envoy.DrainTime)
	} else if c.Envoy.DrainTime%time.Second != 0 {
		p.Addf("envoy.drainTime", "%v is not a whole number of seconds (Envoy's --drain-time-s); use e.g. 30s", c.Envoy.DrainTime)
	}
	if c.Builtin.DrainTime < 0 {
		p.Addf("builtin.drainTime", "%v is negative; use a duration such as 30s", c.Builtin.DrainTime)
	}
	for i, a := range c.Envoy.Args {
		if a == "-c" || a == "--config-path" || strings.HasPrefix(a, "--config-path=") || a == "--drain-time-s" || strings.HasPrefix(a, "--drain-time-s=") {
			p.Addf(fieldf("envoy.args[%d]", i), "%q is set by the daemon; use envoy.bootstrapPath or envoy.drainTime instead", a)
		}
	}
}

func isIP(host string) bool {
	_, err := netip.ParseAddr(host)
	return err == nil
}

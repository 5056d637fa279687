package config

import (
	"net"
	"net/netip"
	"net/url"
	"time"
)

// Peers configures the fleet's gossip: membership and replication of the fleet configuration.
type Peers struct {
	// Bind is the gossip address (UDP and TCP), e.g. 0.0.0.0:7946; empty disables gossip and the
	// instance runs its discovery sources alone (a fleet of one).
	Bind string `yaml:"bind"`
	// Advertise is the address other peers reach this one at, IP:port; default: the bind address
	// (or, when bound to 0.0.0.0, the first private IP).
	Advertise string `yaml:"advertise"`
	// Seeds are peers (host:port) to join at start; any one live peer is enough.
	Seeds []string `yaml:"seeds"`
	// AWS finds the peers among the instances of this instance's EC2 Auto Scaling group.
	AWS *PeersAWS `yaml:"aws"`
	// Keyring is a file of base64 gossip keys (16, 24 or 32 bytes), one per line; the first
	// encrypts, all decrypt (for key rotation). Required unless allowUnencrypted is true.
	Keyring string `yaml:"keyring"`
	// AllowUnencrypted permits gossip without a keyring (an isolated test network only).
	AllowUnencrypted bool `yaml:"allowUnencrypted"`
	// Timing is the failure-detection profile: lan (default), wan, or local (fast, loopback).
	Timing string `yaml:"timing"`
	// TombstoneTTL is how long a delete is remembered; default 24h. A peer cut off for longer
	// than this may bring a deleted entry back when it returns.
	TombstoneTTL time.Duration `yaml:"tombstoneTTL"`
}

// PeersAWS finds peers with the EC2 Auto Scaling and EC2 APIs.
type PeersAWS struct {
	// Region; default: this instance's region (instance metadata).
	Region string `yaml:"region"`
	// AutoScalingGroup; default: the group this instance belongs to.
	AutoScalingGroup string `yaml:"autoScalingGroup"`
	// Endpoint overrides the Auto Scaling and EC2 API endpoint (a VPC endpoint, or tests).
	Endpoint string `yaml:"endpoint"`
}

func (c *Config) peersDefaults() {
	if c.Peers.Timing == "" {
		c.Peers.Timing = "lan"
	}
	if c.Peers.TombstoneTTL == 0 {
		c.Peers.TombstoneTTL = 24 * time.Hour
	}
}

// isLoopbackAddr reports whether host:port names a loopback host.
func isLoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

func (c *Config) peersProblems(p *problems) {
	pe := c.Peers
	if pe.Bind == "" {
		if len(pe.Seeds) > 0 || pe.AWS != nil {
			p.Addf("peers.bind", "required when peers.seeds or peers.aws is set: the gossip address, e.g. 0.0.0.0:7946")
		}
		return
	}
	if _, port, err := net.SplitHostPort(pe.Bind); err != nil || checkHostPort(pe.Bind) != nil {
		p.Addf("peers.bind", "%q is not host:port; use e.g. 0.0.0.0:7946", pe.Bind)
	} else if port == "0" {
		p.Addf("peers.bind", "port 0: peers must know each other's port; use e.g. 0.0.0.0:7946")
	}
	if pe.Advertise != "" {
		if ap, err := netip.ParseAddrPort(pe.Advertise); err != nil || ap.Port() == 0 {
			p.Addf("peers.advertise", "%q is not IP:port; use this instance's private address, e.g. 10.0.1.5:7946", pe.Advertise)
		}
	}
	for i, s := range pe.Seeds {
		if err := checkHostPort(s); err != nil {
			p.Addf(fieldf("peers.seeds[%d]", i), "%v; use host:port, e.g. 10.0.1.5:7946", err)
		}
	}
	if pe.Keyring == "" && !pe.AllowUnencrypted {
		p.Addf("peers.keyring", "required when gossip is on: a file of gossip keys (fwdproxy keygen > /etc/fwdproxy/gossip.keys; chmod 600), or set peers.allowUnencrypted: true on an isolated network")
	}
	if pe.Keyring != "" && pe.AllowUnencrypted {
		p.Addf("peers.allowUnencrypted", "contradicts peers.keyring; remove one of them")
	}
	switch pe.Timing {
	case "lan", "wan", "local":
	default:
		p.Addf("peers.timing", "%q is not a timing profile; use lan, wan or local", pe.Timing)
	}
	if pe.TombstoneTTL < time.Minute {
		p.Addf("peers.tombstoneTTL", "%v is too short for a delete to reach every peer; use at least 1m (default 24h)", pe.TombstoneTTL)
	}
	if a := pe.AWS; a != nil && a.Endpoint != "" {
		if u, err := url.Parse(a.Endpoint); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			p.Addf("peers.aws.endpoint", "%q is not an http(s) URL", a.Endpoint)
		}
	}
}

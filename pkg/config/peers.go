package config

// Peers configures the fleet's gossip.
type Peers struct {
	// Bind is the gossip address; empty disables gossip (a fleet of one).
	Bind string `yaml:"bind"`
	// Seeds are peers to join at start.
	Seeds []string `yaml:"seeds"`
	// Keyring is a file of base64 gossip keys, the first one used to encrypt.
	Keyring string `yaml:"keyring"`
}

// Admin is the fleet admin API.
type Admin struct {
	// Address of the admin API; default 127.0.0.1:9180 (loopback).
	Address string `yaml:"address"`
}

func (c *Config) peersDefaults() {
	if c.Admin.Address == "" {
		c.Admin.Address = "127.0.0.1:9180"
	}
}

func (c *Config) peersProblems(p *problems) {
	if err := checkHostPort(c.Admin.Address); err != nil {
		p.Addf("admin.address", "%v", err)
	}
	if c.Peers.Bind != "" {
		if err := checkHostPort(c.Peers.Bind); err != nil {
			p.Addf("peers.bind", "%v", err)
		}
	}
}

package config

// Envoy configures a supervised Envoy process (dataplane: envoy).
type Envoy struct {
	// Binary is the envoy executable.
	Binary string `yaml:"binary"`
	// AdminAddress is Envoy's admin listener; default 127.0.0.1:15000.
	AdminAddress string `yaml:"adminAddress"`
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
}

func (c *Config) dataplaneProblems(p *problems) {
	if err := checkHostPort(c.Envoy.AdminAddress); err != nil {
		p.Addf("envoy.adminAddress", "%v", err)
	}
	switch c.Dataplane {
	case "builtin":
	case "envoy":
		if c.Envoy.Binary == "" {
			p.Addf("envoy.binary", "required with dataplane: envoy: the path of the envoy executable")
		}
	default:
		p.Addf("dataplane", "%q is not a data plane; use builtin or envoy", c.Dataplane)
	}
}

package config

// ACMPCAIdentity issues the fleet identity from AWS Private CA.
type ACMPCAIdentity struct {
	// CertificateAuthorityARN of the private CA chained to the mesh's root.
	CertificateAuthorityARN string `yaml:"certificateAuthorityArn"`
}

func (c *Config) acmpcaDefaults() {}

func (c *Config) acmpcaProblems(p *problems) {
	if a := c.Identity.ACMPCA; a != nil && a.CertificateAuthorityARN == "" {
		p.Addf("identity.acmpca.certificateAuthorityArn", "required: the ARN of the private CA that issues the fleet identity")
	}
}

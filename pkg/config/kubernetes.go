package config

// KubernetesCluster is one Kubernetes cluster to discover mesh services in.
type KubernetesCluster struct {
	// Name identifies the cluster in logs and metrics.
	Name string `yaml:"name"`
	// Kubeconfig file; empty uses the in-cluster service account.
	Kubeconfig string `yaml:"kubeconfig"`
}

func (c *Config) kubernetesDefaults() {}

func (c *Config) kubernetesProblems(p *problems) {
	for i, k := range c.Discovery.Kubernetes {
		if k.Name == "" {
			p.Addf(fieldf("discovery.kubernetes[%d].name", i), "required: a name for this cluster, e.g. primary")
		}
	}
}

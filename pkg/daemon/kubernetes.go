package daemon

import "github.com/fwdproxy/fwdproxy/pkg/discovery"

// kubernetesSources are the configured Kubernetes clusters' discovery sources.
func (d *Daemon) kubernetesSources() []discovery.Source { return nil }

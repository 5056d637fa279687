package daemon

import (
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// reverseOptions is the reverse section as translation takes it; nil when it lists no service.
func reverseOptions(cfg *config.Config) *controlplane.Reverse {
	r := &cfg.Reverse
	if !r.Enabled() {
		return nil
	}
	out := &controlplane.Reverse{
		Address:        r.Address,
		Port:           r.Port,
		TrustDomain:    cfg.Mesh.TrustDomain,
		ConnectTimeout: r.ConnectTimeout,
		HealthCheck: controlplane.HealthCheck{
			Interval: r.HealthCheck.Interval, Timeout: r.HealthCheck.Timeout,
			UnhealthyThreshold: r.HealthCheck.UnhealthyThreshold, HealthyThreshold: r.HealthCheck.HealthyThreshold,
		},
		Outlier: controlplane.Outlier{
			ConsecutiveErrors: r.Outlier.ConsecutiveErrors, Interval: r.Outlier.Interval,
			BaseEjectionTime: r.Outlier.BaseEjectionTime, MaxEjectionPercent: r.Outlier.MaxEjectionPercent,
		},
	}
	for _, s := range r.Services {
		svc := controlplane.ReverseService{Host: s.Host, Aliases: s.Aliases, Principals: s.Principals()}
		for _, p := range s.Ports {
			svc.Ports = append(svc.Ports, controlplane.ReversePort{
				Number: p.Number, TargetPort: p.TargetPort, Protocol: p.Protocol, HealthCheckPath: p.HealthCheckPath,
			})
		}
		for _, b := range s.Backends {
			host, port := config.SplitBackend(b, 0)
			svc.Backends = append(svc.Backends, controlplane.Backend{Host: host, Port: port})
		}
		out.Services = append(out.Services, svc)
	}
	return out
}

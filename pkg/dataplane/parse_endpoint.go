package dataplane

import (
	"fmt"
	"net"
	"strconv"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
)

func parseCLA(cla *endpoint.ClusterLoadAssignment) ([]endpointSpec, error) {
	var out []endpointSpec
	for i, le := range cla.GetEndpoints() {
		if le.GetPriority() > maxPriority {
			return nil, fmt.Errorf("endpoints[%d].priority: %d is over %d, the most levels this data plane keeps", i, le.GetPriority(), maxPriority)
		}
		if le.GetLedsClusterLocalityConfig() != nil {
			return nil, fmt.Errorf("endpoints[%d]: LEDS is not supported", i)
		}
		for j, lb := range le.GetLbEndpoints() {
			f := fmt.Sprintf("endpoints[%d].lb_endpoints[%d]", i, j)
			ep := lb.GetEndpoint()
			if ep == nil {
				return nil, fmt.Errorf("%s: endpoint is required (named endpoints are not supported)", f)
			}
			sa := ep.GetAddress().GetSocketAddress()
			if sa == nil || sa.GetNamedPort() != "" {
				return nil, fmt.Errorf("%s.endpoint.address: a socket_address with port_value is required", f)
			}
			if net.ParseIP(sa.GetAddress()) == nil {
				return nil, fmt.Errorf("%s.endpoint.address.address: %q is not an IP address", f, sa.GetAddress())
			}
			if sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
				return nil, fmt.Errorf("%s.endpoint.address.port_value: %d is not a port", f, sa.GetPortValue())
			}
			hs := lb.GetHealthStatus()
			out = append(out, endpointSpec{
				addr:     net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))),
				hostname: ep.GetHostname(),
				healthy:  hs == core.HealthStatus_UNKNOWN || hs == core.HealthStatus_HEALTHY || hs == core.HealthStatus_DEGRADED,
				priority: le.GetPriority(),
			})
		}
	}
	return out, nil
}

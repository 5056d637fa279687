package dataplane

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// Active health checks and DNS clusters, as Envoy runs them for the reverse direction's VM
// clusters: a TCP connect or an HTTP GET per host every interval, a host marked down after
// unhealthy_threshold failures and up again after healthy_threshold passes; a STRICT_DNS
// cluster's hosts are every address its names resolve to, re-resolved every 5s (Envoy's default
// dns_refresh_rate).

// healthSpec is a cluster's one active health check.
type healthSpec struct {
	interval, timeout  time.Duration
	unhealthy, healthy uint32
	httpPath, httpHost string // "" path: TCP connect
}

// dnsTarget is a STRICT_DNS endpoint: a name (or IP) and a port.
type dnsTarget struct {
	host string
	port uint32
}

func parseHealthChecks(hcs []*core.HealthCheck) (*healthSpec, error) {
	if len(hcs) == 0 {
		return nil, nil
	}
	if len(hcs) > 1 {
		return nil, fmt.Errorf("health_checks: only one health check is supported, got %d", len(hcs))
	}
	hc := hcs[0]
	s := &healthSpec{
		interval: hc.GetInterval().AsDuration(), timeout: hc.GetTimeout().AsDuration(),
		unhealthy: max(hc.GetUnhealthyThreshold().GetValue(), 1), healthy: max(hc.GetHealthyThreshold().GetValue(), 1),
	}
	if s.interval <= 0 || s.timeout <= 0 {
		return nil, fmt.Errorf("health_checks[0]: interval and timeout are required")
	}
	switch c := hc.GetHealthChecker().(type) {
	case *core.HealthCheck_TcpHealthCheck_:
		if len(c.TcpHealthCheck.GetSend().GetText()) > 0 || len(c.TcpHealthCheck.GetReceive()) > 0 {
			return nil, fmt.Errorf("health_checks[0].tcp_health_check: send and receive are not supported; the check is a connect")
		}
	case *core.HealthCheck_HttpHealthCheck_:
		h := c.HttpHealthCheck
		if h.GetPath() == "" {
			return nil, fmt.Errorf("health_checks[0].http_health_check.path: required")
		}
		s.httpPath, s.httpHost = h.GetPath(), h.GetHost()
	default:
		return nil, fmt.Errorf("health_checks[0]: %T is not supported; use tcp_health_check or http_health_check", hc.GetHealthChecker())
	}
	return s, nil
}

func parseDNSTargets(c *clusterpb.Cluster) ([]dnsTarget, error) {
	var out []dnsTarget
	for i, le := range c.GetLoadAssignment().GetEndpoints() {
		for j, lb := range le.GetLbEndpoints() {
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			if sa == nil || sa.GetAddress() == "" || sa.GetPortValue() == 0 {
				return nil, fmt.Errorf("load_assignment.endpoints[%d].lb_endpoints[%d]: a socket_address with address and port_value is required", i, j)
			}
			out = append(out, dnsTarget{host: sa.GetAddress(), port: sa.GetPortValue()})
		}
	}
	return out, nil
}

// activeLoop resolves a DNS cluster's names and health checks its hosts, for as long as the
// cluster exists; a cluster with neither only waits for its end.
func (c *cluster) activeLoop() {
	var lastDNS time.Time
	for {
		cfg := c.rt.Load().cfg
		wait := 5 * time.Second
		if len(cfg.dns) > 0 && time.Since(lastDNS) >= 5*time.Second {
			c.resolve(cfg.dns)
			lastDNS = time.Now()
		}
		if hc := cfg.health; hc != nil {
			c.checkAll(hc)
			wait = hc.interval
		}
		select {
		case <-c.done:
			return
		case <-time.After(wait):
		}
	}
}

// resolve sets the hosts to every address of the targets; a failed lookup keeps that target's
// hosts of the moment.
func (c *cluster) resolve(targets []dnsTarget) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var eps []endpointSpec
	for _, t := range targets {
		port := strconv.Itoa(int(t.port))
		ips, err := net.DefaultResolver.LookupHost(ctx, t.host)
		if err != nil {
			c.dp.log.Warn("cannot resolve a DNS cluster's endpoint; keeping its last addresses", "cluster", c.name, "host", t.host, "error", err)
			for _, h := range *c.hosts.Load() {
				if h.hostname == t.host {
					eps = append(eps, endpointSpec{addr: h.addr, hostname: t.host, healthy: true})
				}
			}
			continue
		}
		for _, ip := range ips {
			eps = append(eps, endpointSpec{addr: net.JoinHostPort(ip, port), hostname: t.host, healthy: true})
		}
	}
	c.setEndpoints(eps)
}

// checkAll runs one round of checks, all hosts at once.
func (c *cluster) checkAll(hc *healthSpec) {
	var wg sync.WaitGroup
	for _, h := range *c.hosts.Load() {
		wg.Go(func() {
			ok := c.check(hc, h.addr)
			c.mu.Lock()
			defer c.mu.Unlock()
			if ok {
				h.hcFails, h.hcPasses = 0, h.hcPasses+1
				if h.hcFailed.Load() && h.hcPasses >= hc.healthy {
					h.hcFailed.Store(false)
					c.dp.log.Info("endpoint passes its health check again", "cluster", c.name, "endpoint", h.addr)
				}
				return
			}
			h.hcPasses, h.hcFails = 0, h.hcFails+1
			if !h.hcFailed.Load() && h.hcFails >= hc.unhealthy {
				h.hcFailed.Store(true)
				c.dp.metrics.upstreamErrs.WithLabelValues(c.name, "health_check").Inc()
				c.dp.log.Warn("endpoint fails its health check; no traffic until it passes", "cluster", c.name, "endpoint", h.addr)
			}
		})
	}
	wg.Wait()
}

func (c *cluster) check(hc *healthSpec, addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), hc.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return false
	}
	defer conn.Close()
	if hc.httpPath == "" {
		return true
	}
	_ = conn.SetDeadline(time.Now().Add(hc.timeout))
	host := hc.httpHost
	if host == "" {
		host = c.name
	}
	req, err := http.NewRequest(http.MethodGet, "http://"+addr+hc.httpPath, nil)
	if err != nil {
		return false
	}
	req.Host = host
	req.Header.Set("User-Agent", "Envoy/HC")
	req.Close = true
	if err := req.Write(conn); err != nil {
		return false
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode >= 200 && resp.StatusCode < 300
}

//go:build linux

package meshtest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// The mesh roles played by real Envoy processes with static configurations shaped like the ones
// istiod generates (design.md section 2): the east-west gateway's AUTO_PASSTHROUGH listener and a
// sidecar's STRICT mTLS inbound chains. Istio-only extensions (istio.metadata_exchange,
// istio.stats, istio.alpn, peer_metadata) are not in upstream Envoy and are left out; the TCP
// sidecar's metadata-exchange header is written by the application behind it (envoysidecar.go).

// envoyProcess runs Envoy with bootstrap b, its admin interface on admin, and waits until the
// admin interface says the server is LIVE (every static listener is bound then). It probes only
// the admin port: a probe to a listener would count in the listener's stats.
func envoyProcess(name, dir, addr, admin string, b *bootstrap.Bootstrap) (*Process, error) {
	bin, err := EnvoyPath()
	if err != nil {
		return nil, err
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("meshtest: %s bootstrap: %w", name, err)
	}
	js, err := protojson.MarshalOptions{UseProtoNames: true, Multiline: true}.Marshal(b)
	if err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, name+".json")
	if err := os.WriteFile(cfg, js, 0o600); err != nil {
		return nil, err
	}
	// Several Envoys run side by side: no hot-restart shared memory, one worker each.
	p, err := startProcess(name, dir, []string{admin}, bin, "-c", cfg, "--disable-hot-restart",
		"--concurrency", "1", "--log-level", "warning", "--drain-time-s", "1")
	if err != nil {
		return nil, err
	}
	p.Addr, p.Admin = addr, admin
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + admin + "/ready")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.TrimSpace(string(body)) == "LIVE" {
				return p, nil
			}
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("%s not LIVE after 15s: %s", name, p.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// envoyBootstrap is a static bootstrap with the admin interface on admin.
func envoyBootstrap(admin string, listeners []*listener.Listener, clusters []*cluster.Cluster) (*bootstrap.Bootstrap, error) {
	a, err := socketAddress(admin)
	if err != nil {
		return nil, fmt.Errorf("admin address: %w", err)
	}
	return &bootstrap.Bootstrap{
		Node:            &core.Node{Id: "meshtest", Cluster: "meshtest"},
		Admin:           &bootstrap.Admin{Address: a},
		StaticResources: &bootstrap.Bootstrap_StaticResources{Listeners: listeners, Clusters: clusters},
	}, nil
}

func socketAddress(hostport string) (*core.Address, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, err
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("port %q: %w", port, err)
	}
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address: host, PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(n)},
	}}}, nil
}

// staticCluster is a plain TCP cluster with one endpoint.
func staticCluster(name, addr string) (*cluster.Cluster, error) {
	a, err := socketAddress(addr)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", name, err)
	}
	return &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(5 * time.Second),
		LoadAssignment: &endpoint.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpoint.LocalityLbEndpoints{{
			LbEndpoints: []*endpoint.LbEndpoint{{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: a}}}},
		}}},
	}, nil
}

func typed(name string, m proto.Message) (string, *anypb.Any) {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // only registered Envoy types are marshalled here
	}
	return name, a
}

func networkFilter(name string, m proto.Message) *listener.Filter {
	n, a := typed(name, m)
	return &listener.Filter{Name: n, ConfigType: &listener.Filter_TypedConfig{TypedConfig: a}}
}

func tlsInspector() *listener.ListenerFilter {
	n, a := typed("envoy.filters.listener.tls_inspector", &tlsinspector.TlsInspector{})
	return &listener.ListenerFilter{Name: n, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: a}}
}

// StartEnvoyGateway runs Envoy as an AUTO_PASSTHROUGH east-west gateway on addr, configured as
// istiod configures one (builtAutoPassthroughFilterChains, buildOutboundSniDnatClusters): the
// tls_inspector listener filter, one filter chain per target matching its SNI and Istio's mTLS
// ALPNs, no TLS context on the chain (the bytes pass through untouched) and a tcp_proxy to a
// cluster named exactly like the SNI whose endpoint is the target's sidecar. There is no default
// chain: a ClientHello with an unknown SNI or without an Istio ALPN, or no TLS at all, matches
// nothing and Envoy closes the connection (listener.eastwest.no_filter_chain_match).
func StartEnvoyGateway(dir, addr string, routes map[Target]string) (*Process, error) {
	la, err := socketAddress(addr)
	if err != nil {
		return nil, fmt.Errorf("gateway address: %w", err)
	}
	admin, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	targets := make([]Target, 0, len(routes))
	for t := range routes {
		targets = append(targets, t)
	}
	slices.SortFunc(targets, func(a, b Target) int { return strings.Compare(a.SNI(), b.SNI()) })
	l := &listener.Listener{
		Name:            "eastwest",
		StatPrefix:      "eastwest",
		Address:         la,
		ListenerFilters: []*listener.ListenerFilter{tlsInspector()},
	}
	var clusters []*cluster.Cluster
	for _, t := range targets {
		sni := t.SNI()
		l.FilterChains = append(l.FilterChains, &listener.FilterChain{
			Name: sni,
			FilterChainMatch: &listener.FilterChainMatch{
				ServerNames:          []string{sni},
				ApplicationProtocols: slices.Clone(IstioALPN),
			},
			Filters: []*listener.Filter{networkFilter("envoy.filters.network.tcp_proxy", &tcpproxy.TcpProxy{
				StatPrefix:       sni,
				ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: sni},
			})},
		})
		c, err := staticCluster(sni, routes[t])
		if err != nil {
			return nil, err
		}
		clusters = append(clusters, c)
	}
	b, err := envoyBootstrap(admin, []*listener.Listener{l}, clusters)
	if err != nil {
		return nil, err
	}
	return envoyProcess("envoy-gateway-"+strings.ReplaceAll(addr, ":", "-"), dir, addr, admin, b)
}

// EnvoyStats reads the counters and gauges of the Envoy whose admin interface is at admin.
func EnvoyStats(admin string) (map[string]int64, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + admin + "/stats")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("envoy admin /stats: %s", resp.Status)
	}
	out := map[string]int64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), ": ")
		if !ok {
			continue
		}
		if n, err := strconv.ParseInt(v, 10, 64); err == nil { // histograms are not numbers
			out[name] = n
		}
	}
	return out, sc.Err()
}

// EnvoyGatewayStats are the counters of an Envoy gateway from StartEnvoyGateway, from Envoy's
// own stats: Accepted is the listener's downstream_cx_total, Routed the connections its SNI
// clusters opened to sidecars, Refused the connections that matched no filter chain plus the
// sidecar connections that failed.
func EnvoyGatewayStats(p *Process) (GatewayStats, error) {
	if p.Admin == "" {
		return GatewayStats{}, fmt.Errorf("%s is not an Envoy", p.Name)
	}
	st, err := EnvoyStats(p.Admin)
	if err != nil {
		return GatewayStats{}, err
	}
	g := GatewayStats{
		Accepted: st["listener.eastwest.downstream_cx_total"],
		Refused:  st["listener.eastwest.no_filter_chain_match"],
	}
	for name, v := range st {
		rest, ok := strings.CutPrefix(name, "cluster.outbound_.")
		if !ok {
			continue
		}
		switch {
		case strings.HasSuffix(rest, ".upstream_cx_total"):
			g.Routed += v
		case strings.HasSuffix(rest, ".upstream_cx_connect_fail"):
			g.Routed -= v
			g.Refused += v
		}
	}
	return g, nil
}

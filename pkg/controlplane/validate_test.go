package controlplane

import (
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestValidateDeepNamesThePath: an invalid typed config inside an Any is refused with the path to
// it, list items and map entries included, and an Any whose bytes do not decode is refused too.
func TestValidateDeepNamesThePath(t *testing.T) {
	badTCP := mustAny(&tcpproxy.TcpProxy{ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: "c"}}) // no stat_prefix
	l := &listener.Listener{
		Name:    "l",
		Address: socketAddress("127.0.0.1", 1),
		FilterChains: []*listener.FilterChain{
			{Filters: []*listener.Filter{{Name: "ok", ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxy.TcpProxy{StatPrefix: "s", ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: "c"}})}}}},
			{Filters: []*listener.Filter{
				{Name: "ok", ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxy.TcpProxy{StatPrefix: "s", ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: "c"}})}},
				{Name: "bad", ConfigType: &listener.Filter_TypedConfig{TypedConfig: badTCP}},
			}},
		},
	}
	err := ValidateDeep(l)
	if err == nil || !strings.HasPrefix(err.Error(), "filter_chains[1].filters[1].typed_config: ") || !strings.Contains(err.Error(), "StatPrefix") {
		t.Fatalf("list path: %v", err)
	}

	c := &cluster.Cluster{
		Name:                 "c",
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{
			HTTPProtocolOptionsKey: mustAny(&upstreamhttp.HttpProtocolOptions{}), // no upstream protocol
		},
	}
	err = ValidateDeep(c)
	if err == nil || !strings.HasPrefix(err.Error(), "typed_extension_protocol_options["+HTTPProtocolOptionsKey+"]: ") {
		t.Fatalf("map path: %v", err)
	}

	c.TypedExtensionProtocolOptions = nil
	c.TransportSocket = &core.TransportSocket{Name: "tls", ConfigType: &core.TransportSocket_TypedConfig{
		TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", Value: []byte{0xff}},
	}}
	err = ValidateDeep(c)
	if err == nil || !strings.HasPrefix(err.Error(), "transport_socket.typed_config: cannot decode") {
		t.Fatalf("undecodable Any: %v", err)
	}

	// Nested: an Any inside a decoded Any.
	vh := &route.VirtualHost{Name: "v", Domains: []string{"v"}, TypedPerFilterConfig: map[string]*anypb.Any{
		HTTPRBACFilter: mustAny(&rbachttp.RBACPerRoute{}),
	}}
	if err := ValidateDeep(vh); err != nil {
		t.Fatalf("valid virtual host refused: %v", err)
	}
}

// TestPackerTrustsOnlyWhatItValidated: the Builder takes an Any the translation packed valid as
// validated, by its content; an Any packed from an invalid message, or given other bytes since,
// is decoded and refused.
func TestPackerTrustsOnlyWhatItValidated(t *testing.T) {
	cat, opts := loadGolden(t, "testdata/in/minimal-tcp.yaml")
	res, err := Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	v := deepValidator{trusted: res.packed}
	tc := res.Clusters[0].GetTransportSocket().GetTypedConfig()
	if !v.trusted.has(v.key([]byte(tc.TypeUrl), tc.Value)) {
		t.Fatal("a cluster's TLS context, packed valid, is not trusted")
	}

	// An invalid TLS context packed by a packer is not trusted, and the Builder refuses it.
	pk := newPacker(res.packed)
	bad := pk.pack(&tlsv3.UpstreamTlsContext{Sni: strings.Repeat("x", 300)}) // sni is at most 255 bytes
	if len(pk.packed()) != 0 {
		t.Fatal("an invalid message was remembered as valid")
	}
	c := proto.Clone(res.Clusters[0]).(*cluster.Cluster)
	c.TransportSocket.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: bad}
	res.Clusters[0] = c
	res.packed = append(res.packed, pk.packed())
	if _, err := NewSnapshot(res, nil); err == nil || !strings.Contains(err.Error(), "transport_socket.typed_config") || !strings.Contains(err.Error(), "Sni") {
		t.Fatalf("invalid packed TLS context accepted or error unclear: %v", err)
	}

	// A trusted Any given other bytes is decoded and validated again.
	res, _ = Translate(cat, opts)
	c = proto.Clone(res.Clusters[0]).(*cluster.Cluster)
	res.Clusters[0] = c
	tc = c.GetTransportSocket().GetTypedConfig()
	tc.Value = append(proto.Clone(tc).(*anypb.Any).Value, 0x12, 0x01) // sni: a single byte, then garbage
	tc.Value = append(tc.Value, 0xff)
	if _, err := NewSnapshot(res, nil); err == nil || !strings.Contains(err.Error(), "cannot decode") {
		t.Fatalf("changed bytes of a trusted Any accepted: %v", err)
	}
}

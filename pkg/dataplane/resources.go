package dataplane

import (
	"fmt"
	"time"

	streamlog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// This file and parse_{listener,route,cluster,endpoint,secret}.go turn xDS resources into the
// data plane's own immutable configuration values. Every parse function is free of side effects
// on the running data plane, so a whole response can be checked before any of it is applied, and
// errors name the resource and the field.

func fullName(m proto.Message) protoreflect.FullName { return m.ProtoReflect().Descriptor().FullName() }

var (
	nameTCPProxy   = fullName(&tcpproxy.TcpProxy{})
	nameHCM        = fullName(&hcm.HttpConnectionManager{})
	nameNetRBAC    = fullName(&rbacnet.RBAC{})
	nameConnLimit  = fullName(&connlimit.ConnectionLimit{})
	nameHTTPRBAC   = fullName(&rbachttp.RBAC{})
	nameRBACRoute  = fullName(&rbachttp.RBACPerRoute{})
	nameRouter     = fullName(&router.Router{})
	nameStdout     = fullName(&streamlog.StdoutAccessLog{})
	nameUpstreamTL = fullName(&tlsv3.UpstreamTlsContext{})
	nameHTTPOpts   = fullName(&upstreamhttp.HttpProtocolOptions{})
)

// unpack decodes a typed config, naming the field when its type is not linked in.
func unpack(a *anypb.Any, field string) (proto.Message, error) {
	if a == nil {
		return nil, fmt.Errorf("%s: typed_config is required", field)
	}
	m, err := a.UnmarshalNew()
	if err != nil {
		return nil, fmt.Errorf("%s: cannot decode typed_config %s: %v", field, a.GetTypeUrl(), err)
	}
	return m, nil
}

func duration(d *durationpb.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return d.AsDuration()
}

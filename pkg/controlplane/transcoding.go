package controlplane

import (
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	transcoder "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// TranscoderFilter is Envoy's REST/JSON to gRPC filter.
const TranscoderFilter = "envoy.filters.http.grpc_json_transcoder"

// transcoderHTTPFilter goes in the connection manager of a port where some service transcodes.
// It is disabled there and has no services (so Envoy builds no transcoder for it); each virtual
// host that transcodes enables it with its own descriptor set (transcoderPerRoute), since one
// port serves many services, most of them not transcoded.
func transcoderHTTPFilter(pk *packer) *hcm.HttpFilter {
	return &hcm.HttpFilter{
		Name:       TranscoderFilter,
		Disabled:   true,
		ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: pk.pack(&transcoder.GrpcJsonTranscoder{DescriptorSet: &transcoder.GrpcJsonTranscoder_ProtoDescriptorBin{}})},
	}
}

// TranscoderConfig is the grpc_json_transcoder configuration of a service's transcoding. The
// built-in data plane reads the same message and behaves as these settings make Envoy behave:
//   - auto_mapping: a method without a google.api.http rule is POST /package.Service/Method;
//   - convert_grpc_status: a gRPC error becomes its HTTP status with a google.rpc.Status JSON body;
//   - ignore_unknown_query_parameters: legacy clients add cache busters and tracking parameters;
//   - url_unescape_spec ALL_CHARACTERS and query_param_unescape_plus: path and query values are
//     decoded as a form or a browser encodes them;
//   - no request_validation_options: a request that matches no rule (a native gRPC call
//     included) goes to the service untouched;
//   - a server-streaming answer is one JSON array (stream_newline_delimited false);
//   - max_request_body_size and max_response_body_size MaxTranscodedBytes: without them Envoy's
//     limit is the connection's buffer limit (1 MiB), on the request bytes the transcoder holds
//     unparsed, which a body over 1 MiB exceeds or not by how the socket reads happen to fall
//     (under load Envoy answered the same 3 MiB request 200 in one run and 413 in the next), and
//     on an answer, which the transcoder holds whole.
func TranscoderConfig(t *catalog.Transcoding) *transcoder.GrpcJsonTranscoder {
	return &transcoder.GrpcJsonTranscoder{
		DescriptorSet: &transcoder.GrpcJsonTranscoder_ProtoDescriptorBin{ProtoDescriptorBin: t.Descriptor},
		Services:      t.Services,
		PrintOptions: &transcoder.GrpcJsonTranscoder_PrintOptions{
			AlwaysPrintPrimitiveFields: t.Print.EmitDefaults,
			AlwaysPrintEnumsAsInts:     t.Print.EnumsAsInts,
			PreserveProtoFieldNames:    t.Print.ProtoFieldNames,
		},
		AutoMapping:                  true,
		ConvertGrpcStatus:            true,
		IgnoreUnknownQueryParameters: true,
		UrlUnescapeSpec:              transcoder.GrpcJsonTranscoder_ALL_CHARACTERS,
		QueryParamUnescapePlus:       true,
		MaxRequestBodySize:           wrapperspb.UInt32(MaxTranscodedBytes),
		MaxResponseBodySize:          wrapperspb.UInt32(MaxTranscodedBytes),
	}
}

// MaxTranscodedBytes bounds a transcoded exchange: a JSON request body (the built-in data plane
// refuses a larger one with 413; Envoy never holds more of one unparsed) and an answer (500 from
// both past it).
const MaxTranscodedBytes = 16 << 20

// transcodeVirtualHost enables the transcoder on a grpc port's virtual host of a service that
// transcodes.
func transcodeVirtualHost(v *route.VirtualHost, svc *catalog.Service, p catalog.Port, pk *packer) bool {
	if svc.Transcoding == nil || p.Protocol != catalog.GRPC {
		return false
	}
	if v.TypedPerFilterConfig == nil {
		v.TypedPerFilterConfig = map[string]*anypb.Any{}
	}
	v.TypedPerFilterConfig[TranscoderFilter] = pk.pack(TranscoderConfig(svc.Transcoding))
	return true
}

package dataplane

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	transcoderpb "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

func echoTranscoding(t *testing.T) *catalog.Transcoding {
	t.Helper()
	set, err := meshtest.EchoDescriptorSet()
	if err != nil {
		t.Fatal(err)
	}
	return &catalog.Transcoding{DescriptorSet: "echo.pb", Services: []string{meshtest.EchoService}, Descriptor: set}
}

// The transcoder the control plane configures is accepted, and any setting that would make
// Envoy behave otherwise is refused by name.
func TestParseTranscoder(t *testing.T) {
	base := controlplane.TranscoderConfig(echoTranscoding(t))
	tc, err := parseTranscoder(base, "f")
	if err != nil || tc == nil {
		t.Fatalf("control plane config refused: %v", err)
	}
	if again, _ := parseTranscoder(proto.Clone(base).(*transcoderpb.GrpcJsonTranscoder), "f"); again != tc {
		t.Error("the same config is parsed again instead of reused")
	}
	if tc, err := parseTranscoder(&transcoderpb.GrpcJsonTranscoder{DescriptorSet: &transcoderpb.GrpcJsonTranscoder_ProtoDescriptorBin{}}, "f"); tc != nil || err != nil {
		t.Errorf("a transcoder without services: %v %v, want none", tc, err)
	}
	cases := map[string]func(*transcoderpb.GrpcJsonTranscoder){
		"auto_mapping false":                    func(c *transcoderpb.GrpcJsonTranscoder) { c.AutoMapping = false },
		"convert_grpc_status false":             func(c *transcoderpb.GrpcJsonTranscoder) { c.ConvertGrpcStatus = false },
		"ignore_unknown_query_parameters false": func(c *transcoderpb.GrpcJsonTranscoder) { c.IgnoreUnknownQueryParameters = false },
		"url_unescape_spec": func(c *transcoderpb.GrpcJsonTranscoder) {
			c.UrlUnescapeSpec = transcoderpb.GrpcJsonTranscoder_ALL_CHARACTERS_EXCEPT_SLASH
		},
		"print_options add_whitespace": func(c *transcoderpb.GrpcJsonTranscoder) { c.PrintOptions.StreamNewlineDelimited = true },
		"request_validation_options": func(c *transcoderpb.GrpcJsonTranscoder) {
			c.RequestValidationOptions = &transcoderpb.GrpcJsonTranscoder_RequestValidationOptions{RejectUnknownMethod: true}
		},
		"proto_descriptor: a descriptor file": func(c *transcoderpb.GrpcJsonTranscoder) {
			c.DescriptorSet = &transcoderpb.GrpcJsonTranscoder_ProtoDescriptor{ProtoDescriptor: "/etc/x.pb"}
		},
		"is not in the descriptor set": func(c *transcoderpb.GrpcJsonTranscoder) { c.Services = []string{"no.Such"} },
	}
	for want, mutate := range cases {
		c := proto.Clone(base).(*transcoderpb.GrpcJsonTranscoder)
		mutate(c)
		if _, err := parseTranscoder(c, "f"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", want, err)
		}
	}
	// The limits are the config's, as Envoy applies them.
	if tc.maxBody != controlplane.MaxTranscodedBytes || tc.maxMessage != controlplane.MaxTranscodedBytes {
		t.Errorf("limits %d and %d, want the control plane's %d", tc.maxBody, tc.maxMessage, controlplane.MaxTranscodedBytes)
	}
	for _, l := range []struct {
		req, resp     *wrapperspb.UInt32Value
		body, message int
	}{
		{nil, nil, maxTranscodedBody, 1 << 20},                             // Envoy's buffer limit
		{wrapperspb.UInt32(1024), nil, 1024, 1 << 20},                      // under the buffer limit: no raise
		{wrapperspb.UInt32(4 << 20), nil, 4 << 20, 4 << 20},                // the stream's limit raised
		{nil, wrapperspb.UInt32(2 << 20), maxTranscodedBody, 2 << 20},      // the response's own
		{wrapperspb.UInt32(8 << 20), wrapperspb.UInt32(512), 8 << 20, 512}, // each its own
	} {
		c := proto.Clone(base).(*transcoderpb.GrpcJsonTranscoder)
		c.MaxRequestBodySize, c.MaxResponseBodySize = l.req, l.resp
		if tc, err := parseTranscoder(c, "f"); err != nil || tc.maxBody != l.body || tc.maxMessage != l.message {
			t.Errorf("max_request_body_size %v, max_response_body_size %v: %v %v; want %d and %d", l.req, l.resp, tc, err, l.body, l.message)
		}
	}
}

// A translated catalog with transcoding parses: the filter is disabled on the listener, the
// transcoding service's virtual host has its config, the other one none.
func TestParseTranscodingRoutes(t *testing.T) {
	cat := &catalog.Catalog{Services: []catalog.Service{
		{Host: "echo.default.svc.cluster.local", Ports: []catalog.Port{{Number: 8080, Protocol: catalog.GRPC}}, Identities: []string{reviewsID}, Transcoding: echoTranscoding(t)},
		{Host: "plain.default.svc.cluster.local", Ports: []catalog.Port{{Number: 8080, Protocol: catalog.GRPC}}, Identities: []string{reviewsID}},
	}}
	cat.Normalize()
	res := translateCatalog(t, cat)
	dp := New(Options{})
	cfg, err := dp.parseListener(res.Listeners[0], "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.http.transcoder == nil || !cfg.http.transcoder.disabled || cfg.http.transcoder.config != nil {
		t.Fatalf("listener transcoder %+v", cfg.http.transcoder)
	}
	rt, err := parseRouteConfig(res.Routes[0])
	if err != nil {
		t.Fatal(err)
	}
	echo, plain := rt.lookup("echo.default.svc.cluster.local"), rt.lookup("plain.default.svc.cluster.local")
	if transcoderFor(cfg.http, echo, echo.routes[0]) == nil || transcoderFor(cfg.http, plain, plain.routes[0]) != nil {
		t.Error("transcoding applies to the wrong virtual hosts")
	}
}

func translateCatalog(t *testing.T, cat *catalog.Catalog) *controlplane.Resources {
	t.Helper()
	res, err := controlplane.Translate(cat, controlplane.Options{ListenAddress: "0.0.0.0",
		Gateways:       []controlplane.Gateway{{Name: "gw", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:15443")}}},
		ConnectTimeout: time.Second, Outlier: controlplane.Outlier{ConsecutiveErrors: 5, Interval: time.Second, BaseEjectionTime: time.Second, MaxEjectionPercent: 10}})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

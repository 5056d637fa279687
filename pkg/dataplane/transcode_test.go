package dataplane

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	transcoderpb "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	"google.golang.org/protobuf/proto"

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

package controlplane

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	transcoder "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// transcodingCatalog is a grpc service that transcodes (the Echo test service, with a subset)
// sharing its port with one that does not.
func transcodingCatalog(t testing.TB) *catalog.Catalog {
	t.Helper()
	set, err := meshtest.EchoDescriptorSet()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "echo.pb"), set, 0o644); err != nil {
		t.Fatal(err)
	}
	doc := `services:
  - host: echo.demo.svc.cluster.local
    ports: [{number: 8080, protocol: grpc}]
    identities: [spiffe://cluster.local/ns/demo/sa/echo]
    subsets: [{name: v2, hosts: [echo-v2.example.internal]}]
    transcoding:
      descriptorSet: echo.pb
      services: [` + meshtest.EchoService + `]
      print: {protoFieldNames: true, emitDefaults: true}
  - host: plain.demo.svc.cluster.local
    ports: [{number: 8080, protocol: grpc}]
    identities: [spiffe://cluster.local/ns/demo/sa/plain]
`
	path := filepath.Join(dir, "catalog.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cat, err := catalog.Load(path, catalog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return cat
}

func transcodingOptions() Options {
	return Options{
		ListenAddress:  "127.0.0.1",
		ConnectTimeout: time.Second,
		Outlier:        Outlier{ConsecutiveErrors: 5, Interval: 10 * time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
		Gateways:       []Gateway{{Name: "gw", Addresses: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15443")}}},
	}
}

// TestTranscodingPerVirtualHost: the port's connection manager has the transcoder, disabled,
// between RBAC and the router; only the transcoding service's virtual hosts (its subset's too)
// enable it, with the descriptor set, services and print options of the catalog.
func TestTranscodingPerVirtualHost(t *testing.T) {
	cat := transcodingCatalog(t)
	res, err := Translate(cat, transcodingOptions())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewSnapshot(res, nil); err != nil {
		t.Fatalf("snapshot invalid: %v", err)
	}
	if len(res.Listeners) != 1 {
		t.Fatalf("%d listeners, want 1", len(res.Listeners))
	}
	var m hcm.HttpConnectionManager
	for _, f := range res.Listeners[0].FilterChains[0].Filters {
		if f.Name == "envoy.filters.network.http_connection_manager" {
			if err := f.GetTypedConfig().UnmarshalTo(&m); err != nil {
				t.Fatal(err)
			}
		}
	}
	var names []string
	for _, f := range m.HttpFilters {
		names = append(names, f.Name)
		if f.Name == TranscoderFilter && !f.Disabled {
			t.Error("the transcoder is enabled for every virtual host of the port")
		}
	}
	if !slices.Equal(names, []string{TranscoderFilter, "envoy.filters.http.router"}) {
		t.Errorf("HTTP filters %q", names)
	}
	set := cat.Lookup("echo.demo.svc.cluster.local").Transcoding.Descriptor
	got := map[string]bool{}
	for _, vh := range res.Routes[0].VirtualHosts {
		a := vh.TypedPerFilterConfig[TranscoderFilter]
		got[vh.Name] = a != nil
		if a == nil {
			continue
		}
		var tc transcoder.GrpcJsonTranscoder
		if err := a.UnmarshalTo(&tc); err != nil {
			t.Fatal(err)
		}
		want := &transcoder.GrpcJsonTranscoder{
			DescriptorSet: &transcoder.GrpcJsonTranscoder_ProtoDescriptorBin{ProtoDescriptorBin: set},
			Services:      []string{meshtest.EchoService},
			PrintOptions:  &transcoder.GrpcJsonTranscoder_PrintOptions{PreserveProtoFieldNames: true, AlwaysPrintPrimitiveFields: true},
			AutoMapping:   true, ConvertGrpcStatus: true, IgnoreUnknownQueryParameters: true,
			UrlUnescapeSpec: transcoder.GrpcJsonTranscoder_ALL_CHARACTERS, QueryParamUnescapePlus: true,
			MaxRequestBodySize: wrapperspb.UInt32(16 << 20), MaxResponseBodySize: wrapperspb.UInt32(16 << 20),
		}
		if !proto.Equal(&tc, want) {
			t.Errorf("%s: transcoder config differs from the catalog's", vh.Name)
		}
	}
	wantVH := map[string]bool{"echo.demo.svc.cluster.local:8080": true, "v2.echo.demo.svc.cluster.local:8080": true, "plain.demo.svc.cluster.local:8080": false}
	if len(got) != len(wantVH) {
		t.Errorf("virtual hosts %v", got)
	}
	for k, v := range wantVH {
		if got[k] != v {
			t.Errorf("virtual host %s transcodes: %v, want %v", k, got[k], v)
		}
	}
}

// TestEnvoyAcceptsTranscoding: real Envoy loads the transcoder with the descriptor set, static
// and as served over ADS.
func TestEnvoyAcceptsTranscoding(t *testing.T) {
	opts := transcodingOptions()
	res, err := Translate(transcodingCatalog(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	envoyValidate(t, staticRender(t, dir, res, opts))
	_, _, _, bundle := identityFiles(t, t.TempDir())
	envoyValidate(t, writeJSON(t, dir, "ads.json", adsEquivalent(t, res, Secrets(bundle))))
}

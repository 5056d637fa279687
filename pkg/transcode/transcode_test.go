package transcode_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/transcode"
)

func TestParseTemplate(t *testing.T) {
	cases := []struct {
		in, key, verb string
		vars          int
	}{
		{"/v1/items", "/v1/items", "", 0},
		{"/v1/{name=shelves/*}/items/{id}", "/v1/shelves/*/items/*", "", 2},
		{"/v1/{path=**}", "/v1/**", "", 1},
		{"/v1/items/{id}:peek", "/v1/items/*:peek", "peek", 1},
		{"/v1/{a.b}/x", "/v1/*/x", "", 1},
	}
	for _, c := range cases {
		tm, err := transcode.ParseTemplate(c.in)
		if err != nil {
			t.Errorf("%s: %v", c.in, err)
			continue
		}
		if tm.Key() != c.key || tm.Verb != c.verb || len(tm.Vars) != c.vars {
			t.Errorf("%s: key %s verb %q vars %d; want %s %q %d", c.in, tm.Key(), tm.Verb, len(tm.Vars), c.key, c.verb, c.vars)
		}
	}
	for _, bad := range []string{"v1/items", "/v1//items", "/v1/items/", "/v1/{id", "/v1/x{id}", "/v1/**/x", "/v1/{1a}", "/v1:"} {
		if _, err := transcode.ParseTemplate(bad); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}

func echoSet(t *testing.T) *transcode.Set {
	t.Helper()
	b, err := meshtest.EchoDescriptorSet()
	if err != nil {
		t.Fatal(err)
	}
	s, err := transcode.New(b, []string{meshtest.EchoService})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestMatch(t *testing.T) {
	s := echoSet(t)
	cases := []struct {
		method, path, grpc string
		vars               []string
	}{
		{"GET", "/v1/shelves/a/items/b", "/meshtest.echo.v1.Echo/GetItem", []string{"a", "b"}},
		{"GET", "/v1/shelves/a%2Fb/items/c%20d", "/meshtest.echo.v1.Echo/GetItem", []string{"a/b", "c d"}},
		{"GET", "/v1/items/7:peek", "/meshtest.echo.v1.Echo/GetItem", []string{"7"}},
		{"GET", "/v1/shelves/a/items", "/meshtest.echo.v1.Echo/ListItems", []string{"a"}},
		{"POST", "/v1/shelves/a/items", "/meshtest.echo.v1.Echo/CreateItem", []string{"a"}},
		{"POST", "/meshtest.echo.v1.Echo/Echo", "/meshtest.echo.v1.Echo/Echo", []string{}},
		{"GET", "/v1/items/7", "", nil},
		{"DELETE", "/v1/fail", "", nil},
		{"POST", "/meshtest.echo.v1.Echo/GetItem", "", nil}, // it has a rule: no automatic binding
	}
	for _, c := range cases {
		b, vars := s.Match(c.method, c.path)
		got := ""
		if b != nil {
			got = b.GRPCPath
		}
		if got != c.grpc || (b != nil && !slices.Equal(vars, c.vars)) {
			t.Errorf("%s %s: %s %q, want %s %q", c.method, c.path, got, vars, c.grpc, c.vars)
		}
	}
}

func TestRequest(t *testing.T) {
	s := echoSet(t)
	c := transcode.NewCodec(s, transcode.PrintOptions{})
	b, vars := s.Match("GET", "/v1/shelves/s/items/i")
	data, err := c.Request(b, vars, "tags=a&tags=b+c&kind=KIND_BOOK&limit=3&verbose=1&nope=x", nil)
	if err != nil {
		t.Fatal(err)
	}
	msg := dynamicpb.NewMessage(b.Method.Input())
	if err := proto.Unmarshal(data, msg); err != nil {
		t.Fatal(err)
	}
	j, _ := protojson.Marshal(msg)
	want := `{"shelf":"s","id":"i","verbose":true,"tags":["a","b c"],"kind":"KIND_BOOK","limit":3}`
	if got := compactJSON(j); got != want {
		t.Errorf("request %s, want %s", got, want)
	}
	_, err = c.Request(b, vars, "limit=many", nil)
	var re *transcode.RequestError
	if !errors.As(err, &re) || err.Error() != `limit.value: invalid value "many" for type TYPE_INT32` {
		t.Errorf("bad query value: %v", err)
	}
	// A field body: the body is the field's JSON; the path fills the rest.
	b, vars = s.Match("POST", "/v1/shelves/s/items")
	data, err = c.Request(b, vars, "", []byte(`{"display_name":"x","unknown":1}`))
	if err != nil {
		t.Fatal(err)
	}
	msg = dynamicpb.NewMessage(b.Method.Input())
	_ = proto.Unmarshal(data, msg)
	j, _ = protojson.Marshal(msg)
	if got := compactJSON(j); got != `{"shelf":"s","item":{"displayName":"x"}}` {
		t.Errorf("field body request %s", got)
	}
}

func TestResponseAndStatus(t *testing.T) {
	s := echoSet(t)
	b, _ := s.Match("GET", "/v1/shelves/s/items/i")
	item := dynamicpb.NewMessage(b.Method.Output())
	item.Set(item.Descriptor().Fields().ByName("display_name"), protoreflectString("n"))
	data, _ := proto.Marshal(item)
	for _, c := range []struct {
		p    transcode.PrintOptions
		want string
	}{
		{transcode.PrintOptions{}, `{"displayName":"n"}`},
		{transcode.PrintOptions{ProtoFieldNames: true}, `{"display_name":"n"}`},
		{transcode.PrintOptions{EmitDefaults: true, EnumsAsInts: true}, `{"shelf":"","id":"","displayName":"n","size":"0","kind":0,"tags":[],"payload":"","caller":"","method":"","metadata":{}}`},
	} {
		j, err := transcode.NewCodec(s, c.p).Response(b, data)
		if err != nil || string(j) != c.want {
			t.Errorf("%+v: %s %v, want %s", c.p, j, err, c.want)
		}
	}
	if j := string(transcode.NewCodec(s, transcode.PrintOptions{}).Status(5, "gone", nil)); j != `{"code":5,"message":"gone"}` {
		t.Errorf("status %s", j)
	}
	if transcode.HTTPStatus(5) != 404 || transcode.HTTPStatus(14) != 503 || transcode.HTTPStatus(99) != 500 {
		t.Error("gRPC to HTTP status mapping")
	}
}

func protoreflectString(s string) protoreflect.Value { return protoreflect.ValueOfString(s) }

func compactJSON(j []byte) string {
	var buf bytes.Buffer
	_ = json.Compact(&buf, j)
	return buf.String()
}

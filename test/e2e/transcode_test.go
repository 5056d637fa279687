//go:build linux

package e2e_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

const echoHost = "echo.bookinfo.svc.cluster.local"

// echoTranscoding is the catalog's transcoding block for the Echo service; it writes the
// descriptor set next to the catalog.
func (e *env) echoTranscoding() string {
	e.t.Helper()
	set, err := meshtest.EchoDescriptorSet()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.dir, "echo.pb"), set, 0o644); err != nil {
		e.t.Fatal(err)
	}
	return "    transcoding: {descriptorSet: echo.pb, services: [" + meshtest.EchoService + "]}\n"
}

// jsonAnswer is a transcoded exchange as the VM sees it.
type jsonAnswer struct {
	code   int
	header http.Header
	body   []byte
}

func (a jsonAnswer) object(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(a.body, &m); err != nil {
		t.Fatalf("answer %d is not a JSON object: %v: %.300q", a.code, err, a.body)
	}
	return m
}

// rest sends a REST/JSON request to the Echo service's port.
func (e *env) rest(method, path, body string, hdr http.Header) (jsonAnswer, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, "http://127.0.0.1:"+strconv.Itoa(e.ports.grpc)+path, rd)
	if err != nil {
		return jsonAnswer{}, err
	}
	req.Host = echoHost
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := e.client("").Do(req)
	if err != nil {
		return jsonAnswer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return jsonAnswer{resp.StatusCode, resp.Header, b}, err
}

func (e *env) mustREST(t *testing.T, method, path, body string, hdr http.Header) jsonAnswer {
	t.Helper()
	a, err := e.rest(method, path, body, hdr)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return a
}

// wantFields checks the listed fields of a JSON object (numbers compare as float64).
func wantFields(t *testing.T, what string, got map[string]any, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if !reflect.DeepEqual(got[k], v) {
			t.Errorf("%s: %s = %#v, want %#v (answer %v)", what, k, got[k], v, got)
		}
	}
}

// runTranscoding: REST/JSON in and out of a real grpc-go service behind the mesh's sidecar.
func runTranscoding(t *testing.T, newMesh func(testing.TB, *meshtest.CA, ports) *mesh, dp dataplane) {
	e := start(t, newMesh, dp)
	// HAProxy cannot put the caller's URI SAN in its XFCC element; the others can.
	caller := fleetID
	if e.mesh.kind == "debian" {
		caller = ""
	}

	t.Run("PathAndQuery", func(t *testing.T) {
		e.t = t
		a := e.mustREST(t, "GET", "/v1/shelves/s1/items/a%20b?verbose=true&tags=x&tags=y+z&kind=KIND_BOOK&limit=5&cachebuster=1",
			"", http.Header{"X-Legacy-App": {"billing"}, meshtest.EchoMetadataHeader: {"x-legacy-app"}})
		if a.code != 200 || !strings.HasPrefix(a.header.Get("Content-Type"), "application/json") {
			t.Fatalf("status %d content-type %q: %s", a.code, a.header.Get("Content-Type"), a.body)
		}
		wantFields(t, "GetItem", a.object(t), map[string]any{
			"shelf": "s1", "id": "a b", "displayName": "item a b", "size": "3", "kind": "KIND_BOOK",
			"tags": []any{"x", "y z"}, "limit": float64(5), "method": "/meshtest.echo.v1.Echo/GetItem",
			"metadata": map[string]any{"x-legacy-app": "billing"},
		})
		if got := a.object(t)["caller"]; caller != "" && got != caller {
			t.Errorf("the service saw caller %v, want %s", got, caller)
		}
		// The gRPC response metadata reaches the VM as headers.
		if a.header.Get(meshtest.EchoHeader) != "echo" {
			t.Errorf("response header %s = %q, want echo (headers %v)", meshtest.EchoHeader, a.header.Get(meshtest.EchoHeader), a.header)
		}
	})

	t.Run("AdditionalBindingWithVerb", func(t *testing.T) {
		e.t = t
		a := e.mustREST(t, "GET", "/v1/items/7:peek", "", nil)
		if a.code != 200 {
			t.Fatalf("status %d: %s", a.code, a.body)
		}
		wantFields(t, "GetItem", a.object(t), map[string]any{"id": "7", "displayName": "item 7"})
	})

	t.Run("FieldBody", func(t *testing.T) {
		e.t = t
		a := e.mustREST(t, "POST", "/v1/shelves/s2/items", `{"displayName":"Dune","size":"412","kind":"KIND_RECORD"}`, nil)
		if a.code != 200 {
			t.Fatalf("status %d: %s", a.code, a.body)
		}
		wantFields(t, "CreateItem", a.object(t), map[string]any{"shelf": "s2", "id": "created", "displayName": "Dune", "size": "412", "kind": "KIND_RECORD"})
	})

	t.Run("WholeBody", func(t *testing.T) {
		e.t = t
		a := e.mustREST(t, "PUT", "/v1/shelves/s3/items/9", `{"display_name":"proto name","tags":["a"]}`, nil)
		if a.code != 200 {
			t.Fatalf("status %d: %s", a.code, a.body)
		}
		wantFields(t, "UpdateItem", a.object(t), map[string]any{"shelf": "s3", "id": "9", "displayName": "proto name", "tags": []any{"a"}})
	})

	t.Run("MethodWithoutRule", func(t *testing.T) {
		e.t = t
		a := e.mustREST(t, "POST", "/meshtest.echo.v1.Echo/Echo", `{"id":"auto"}`, nil)
		if a.code != 200 {
			t.Fatalf("status %d: %s", a.code, a.body)
		}
		wantFields(t, "Echo", a.object(t), map[string]any{"id": "auto", "method": "/meshtest.echo.v1.Echo/Echo"})
	})

	t.Run("Errors", func(t *testing.T) {
		e.t = t
		for code, status := range map[int]int{3: 400, 5: 404, 7: 403, 8: 429, 12: 501, 13: 500, 14: 503, 16: 401} {
			a := e.mustREST(t, "POST", "/v1/fail", fmt.Sprintf(`{"code":%d,"message":"failed on purpose"}`, code), nil)
			if a.code != status || !strings.HasPrefix(a.header.Get("Content-Type"), "application/json") {
				t.Errorf("gRPC code %d: HTTP %d (%q), want %d: %s", code, a.code, a.header.Get("Content-Type"), status, a.body)
				continue
			}
			wantFields(t, fmt.Sprintf("code %d", code), a.object(t), map[string]any{"code": float64(code), "message": "failed on purpose"})
		}
		// JSON the request message cannot hold is the client's fault.
		if a := e.mustREST(t, "POST", "/v1/shelves/s1/items", `{"displayName":`, nil); a.code != 400 {
			t.Errorf("truncated JSON: %d %s, want 400", a.code, a.body)
		}
		if a := e.mustREST(t, "POST", "/v1/shelves/s1/items", `{"size":"many"}`, nil); a.code != 400 {
			t.Errorf("a value of the wrong type: %d %s, want 400", a.code, a.body)
		}
		// Fields the message does not have are skipped, as Envoy's parser skips them.
		if a := e.mustREST(t, "POST", "/v1/shelves/s1/items", `{"noSuchField":1}`, nil); a.code != 200 {
			t.Errorf("unknown field: %d %s, want 200", a.code, a.body)
		}
	})

	t.Run("LargeMessage", func(t *testing.T) {
		e.t = t
		payload := bytes.Repeat([]byte("0123456789abcdef"), 32<<10) // 512 KiB
		body := `{"id":"big","payload":"` + base64.StdEncoding.EncodeToString(payload) + `"}`
		a := e.mustREST(t, "PUT", "/v1/shelves/s1/items/big", body, nil)
		if a.code != 200 {
			t.Fatalf("status %d: %.300s", a.code, a.body)
		}
		got, _ := base64.StdEncoding.DecodeString(fmt.Sprint(a.object(t)["payload"]))
		if !bytes.Equal(got, payload) {
			t.Errorf("payload came back as %d bytes, want %d", len(got), len(payload))
		}
	})

	t.Run("ServerStreaming", func(t *testing.T) {
		e.t = t
		a := e.mustREST(t, "GET", "/v1/shelves/s4/items?count=3", "", nil)
		if a.code != 200 {
			t.Fatalf("status %d: %s", a.code, a.body)
		}
		var items []map[string]any
		if err := json.Unmarshal(a.body, &items); err != nil {
			t.Fatalf("not a JSON array: %v: %s", err, a.body)
		}
		if len(items) != 3 {
			t.Fatalf("%d items, want 3: %s", len(items), a.body)
		}
		for i, it := range items {
			wantFields(t, "item "+strconv.Itoa(i), it, map[string]any{"shelf": "s4", "id": strconv.Itoa(i)})
		}
	})

	t.Run("NativeGRPCPassesThrough", func(t *testing.T) {
		e.t = t
		conn, err := grpc.NewClient("127.0.0.1:"+strconv.Itoa(e.ports.grpc), grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority(echoHost))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fd, err := echoDescriptor()
		if err != nil {
			t.Fatal(err)
		}
		md := fd.Services().ByName("Echo").Methods().ByName("Echo")
		in, out := dynamicpb.NewMessage(md.Input()), dynamicpb.NewMessage(md.Output())
		in.Set(md.Input().Fields().ByName("id"), protoreflect.ValueOfString("native"))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var hdr metadata.MD
		if err := conn.Invoke(ctx, "/meshtest.echo.v1.Echo/Echo", in, out, grpc.Header(&hdr)); err != nil {
			t.Fatal(err)
		}
		if got := out.Get(md.Output().Fields().ByName("id")).String(); got != "native" {
			t.Errorf("id %q, want native", got)
		}
	})

	t.Run("IdentityRotationUnderLoad", func(t *testing.T) {
		e.t = t
		l := &load{stop: make(chan struct{})}
		for range 3 {
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				for i := 0; i < 100000; i++ {
					select {
					case <-l.stop:
						return
					default:
					}
					a, err := e.rest("GET", "/v1/shelves/load/items/"+strconv.Itoa(i), "", nil)
					if err == nil && (a.code != 200 || !bytes.Contains(a.body, []byte(`"id":"`+strconv.Itoa(i)+`"`))) {
						err = fmt.Errorf("status %d: %.200s", a.code, a.body)
					}
					if err != nil {
						l.failed.Add(1)
						l.mu.Lock()
						if len(l.errs) < 5 {
							l.errs = append(l.errs, err.Error())
						}
						l.mu.Unlock()
						continue
					}
					l.ok.Add(1)
				}
			}()
		}
		l.progress(t, 20)
		e.rotateFleetCert()
		l.progress(t, 20)
		l.finish(t)
	})
}

var echoDescriptor = meshtest.EchoFile

func TestTranscodingBuiltinGoMesh(t *testing.T)     { runTranscoding(t, goMesh, builtin) }
func TestTranscodingBuiltinDebianMesh(t *testing.T) { runTranscoding(t, debianMesh, builtin) }
func TestTranscodingBuiltinEnvoyMesh(t *testing.T)  { runTranscoding(t, envoyMesh, builtin) }
func TestTranscodingEnvoyGoMesh(t *testing.T)       { runTranscoding(t, goMesh, envoyDataplane(t)) }
func TestTranscodingEnvoyDebianMesh(t *testing.T)   { runTranscoding(t, debianMesh, envoyDataplane(t)) }
func TestTranscodingEnvoyEnvoyMesh(t *testing.T)    { runTranscoding(t, envoyMesh, envoyDataplane(t)) }

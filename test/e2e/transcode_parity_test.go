//go:build linux

package e2e_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// transcodeCase is one REST/JSON request to the Echo service, answered by both data planes.
type transcodeCase struct {
	name, method, path, body string
	header                   http.Header
	// parseError: the body is the JSON parser's message, worded by each data plane's own
	// parser (README: "Where the two data planes differ"); status and headers are equal.
	parseError bool
}

var transcodeCases = []transcodeCase{
	{name: "path and query", method: "GET", path: "/v1/shelves/s1/items/a%20b?verbose=true&tags=x&tags=y+z&kind=KIND_BOOK&limit=5"},
	{name: "enum by number", method: "GET", path: "/v1/shelves/s1/items/1?kind=2"},
	{name: "escaped slash in a segment", method: "GET", path: "/v1/shelves/a%2Fb/items/c%3Fd"},
	{name: "unknown query parameter", method: "GET", path: "/v1/shelves/s1/items/1?utm_source=mail"},
	{name: "query parameter of the wrong type", method: "GET", path: "/v1/shelves/s1/items/1?limit=many"},
	{name: "repeated scalar given twice", method: "GET", path: "/v1/shelves/s1/items/1?verbose=true&verbose=false"},
	{name: "custom verb", method: "GET", path: "/v1/items/7:peek"},
	{name: "field body", method: "POST", path: "/v1/shelves/s2/items", body: `{"displayName":"Dune","size":"412","kind":"KIND_RECORD"}`},
	{name: "field body with an unknown field", method: "POST", path: "/v1/shelves/s2/items", body: `{"noSuchField":1}`},
	{name: "whole body", method: "PUT", path: "/v1/shelves/s3/items/9", body: `{"display_name":"n","tags":["a","b"],"size":7}`},
	{name: "whole body, path wins", method: "PUT", path: "/v1/shelves/s3/items/9", body: `{"shelf":"other","id":"1"}`},
	{name: "whole body with an unknown field", method: "PUT", path: "/v1/shelves/s3/items/9", body: `{"nope":true}`},
	{name: "truncated JSON", method: "POST", path: "/v1/fail", body: `{"code":`, parseError: true},
	{name: "not JSON", method: "POST", path: "/v1/fail", body: `hello`, parseError: true},
	{name: "JSON of the wrong type", method: "POST", path: "/v1/fail", body: `{"code":"five"}`, parseError: true},
	{name: "empty body", method: "POST", path: "/meshtest.echo.v1.Echo/Echo"},
	{name: "method without a rule", method: "POST", path: "/meshtest.echo.v1.Echo/Echo", body: `{"id":"auto","kind":"KIND_BOOK"}`},
	{name: "not found", method: "POST", path: "/v1/fail", body: `{"code":5,"message":"no such item"}`},
	{name: "unavailable", method: "POST", path: "/v1/fail", body: `{"code":14,"message":"try later"}`},
	{name: "invalid argument", method: "POST", path: "/v1/fail", body: `{"code":3,"message":"bad"}`},
	{name: "message with unicode and quotes", method: "POST", path: "/v1/fail", body: `{"code":9,"message":"née \"x\" 100%"}`},
	{name: "stream", method: "GET", path: "/v1/shelves/s4/items?count=3"},
	{name: "empty stream", method: "GET", path: "/v1/shelves/s4/items?count=0"},
	{name: "stream that fails", method: "GET", path: "/v1/shelves/s4/items?count=3&failAfter=2"},
	{name: "metadata to and from the service", method: "GET", path: "/v1/shelves/s1/items/m",
		header: http.Header{"X-Legacy-App": {"billing"}, "X-Echo-Metadata": {"x-legacy-app,user-agent"}, "User-Agent": {"vm/1"}}},
	{name: "no rule for this path", method: "GET", path: "/v2/nothing"},
	{name: "no rule for this verb", method: "DELETE", path: "/v1/fail"},
	{name: "a body over 1 MiB", method: "PUT", path: "/v1/shelves/s1/items/big", body: `{"displayName":"` + strings.Repeat("x", 1100<<10) + `"}`},
	{name: "a request body of 3 MiB", method: "POST", path: "/meshtest.echo.v1.Echo/Echo", body: `{"id":"x","ignored":"` + strings.Repeat("x", 3<<20) + `"}`},
	{name: "a body under 1 MiB", method: "PUT", path: "/v1/shelves/s1/items/big", body: `{"displayName":"` + strings.Repeat("x", 1000<<10) + `"}`},
}

// transcodeHeaders are the response headers compared.
var transcodeHeaders = []string{"Content-Type", "Grpc-Status", "Grpc-Message", "X-Echo-Served-By", "X-Echo-Trailer", "Content-Length"}

type transcodeAnswer struct {
	status  int
	headers map[string]string
	body    string
}

func (e *env) transcodeAnswer(c transcodeCase) (transcodeAnswer, error) {
	a, err := e.rest(c.method, c.path, c.body, c.header)
	if err != nil {
		return transcodeAnswer{}, err
	}
	out := transcodeAnswer{status: a.code, headers: map[string]string{}}
	for _, h := range transcodeHeaders {
		if v := a.header.Values(h); len(v) > 0 {
			out.headers[h] = strings.Join(v, ",")
		}
	}
	var v any
	if json.Unmarshal(a.body, &v) == nil {
		// Equal JSON values compare equal, whatever the spacing and the order of a map's keys
		// (each data plane prints a proto map in its own order; fields keep theirs).
		j, _ := json.Marshal(v)
		out.body = string(j)
	} else {
		out.body = fmt.Sprintf("%q", a.body)
	}
	var hk []string
	for k := range a.header {
		hk = append(hk, k)
	}
	slices.Sort(hk)
	out.headers["(names)"] = strings.Join(hk, " ")
	return out, nil
}

// TestTranscodingParity sends the same REST/JSON requests through Envoy and the built-in data
// plane, each in front of its own Go mesh, and compares status, headers and the JSON body.
func TestTranscodingParity(t *testing.T) {
	b := start(t, goMesh, builtin)
	en := start(t, goMesh, envoyDataplane(t))
	for _, c := range transcodeCases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			b.t, en.t = t, t
			ab, errB := b.transcodeAnswer(c)
			ae, errE := en.transcodeAnswer(c)
			if errB != nil || errE != nil {
				t.Fatalf("builtin: %v; envoy: %v", errB, errE)
			}
			sameBody := ab.body == ae.body
			if c.parseError {
				sameBody = ab.body != "" && ae.body != ""
				delete(ab.headers, "Content-Length")
				delete(ae.headers, "Content-Length")
			}
			if ab.status != ae.status || fmt.Sprint(ab.headers) != fmt.Sprint(ae.headers) || !sameBody {
				t.Errorf("differ:\n builtin %d %v %s\n envoy   %d %v %s", ab.status, ab.headers, ab.body, ae.status, ae.headers, ae.body)
			}
		})
	}
}

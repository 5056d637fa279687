package dataplane

import (
	"bufio"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// The direct path sends upstream and answers downstream exactly what ReverseProxy does: the
// same raw requests, once through each, give the same request at the service and the same
// response at the client (the request ID and Date aside, which differ per request).
func TestDirectPathMatchesReverseProxy(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	svc := reviews(port, catalog.HTTP)
	e.pushApplied(&catalog.Catalog{Services: []catalog.Service{svc}}, e.options(mesh.addr), nil)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	host := svc.Host
	requests := []string{
		"GET /plain HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"GET /ua?a=1&b=%41 HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: legacy/1\r\nAccept: */*\r\nX-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: front\r\nForwarded: for=1.2.3.4\r\n\r\n",
		"GET /q?a=1;b=2 HTTP/1.1\r\nHost: " + host + "\r\n\r\n", // ReverseProxy re-encodes: not direct
		"GET /conn HTTP/1.1\r\nHost: " + host + "\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n",
		"GET /old HTTP/1.0\r\nHost: " + host + "\r\n\r\n",
		"HEAD /head HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"GET /fail HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"GET /then-close HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"GET /multi HTTP/1.1\r\nHost: " + host + "\r\nX-Private: a\r\nX-Private: b\r\n\r\n",
	}
	type outcome struct {
		upstream http.Header
		status   int
		header   http.Header
		body     string
	}
	run := func(raw string, off bool) outcome {
		t.Helper()
		directDisabled.Store(off)
		defer directDisabled.Store(false)
		before := len(mesh.received())
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		req, _ := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		resp, err := http.ReadResponse(bufio.NewReader(c), req)
		if err != nil {
			t.Fatalf("%q: %v", raw, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		o := outcome{status: resp.StatusCode, header: maps.Clone(resp.Header), body: string(b)}
		for _, k := range []string{"Date", "X-Seen-Request-Id", "X-Request-Id"} {
			delete(o.header, k)
		}
		if seen := mesh.received(); len(seen) > before {
			o.upstream = maps.Clone(seen[len(seen)-1].header)
			delete(o.upstream, "X-Request-Id")
		}
		return o
	}
	for _, raw := range requests {
		direct, rp := run(raw, false), run(raw, true)
		if !reflect.DeepEqual(direct, rp) {
			t.Errorf("%q:\ndirect:       %+v\nreverseproxy: %+v", raw, direct, rp)
		}
		if direct.upstream == nil {
			t.Errorf("%q: the service saw no request", raw)
		}
	}
}

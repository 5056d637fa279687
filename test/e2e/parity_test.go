//go:build linux

package e2e_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// parityCase is one request a legacy VM may send, answered by both data planes.
type parityCase struct {
	name string
	// raw is the request as written on the wire; HOST and PORT are replaced.
	raw string
	// from is the client's source address ("" for any).
	from string
	// port picks the listener: "http" or "h2".
	port string
	// bodyPrefix, when set, is what both bodies start with; the rest may differ (README:
	// "Where the two data planes differ"). Otherwise bodies are equal.
	bodyPrefix string
	// headersDiffer: the proxy-set headers may differ (README, as above).
	headersDiffer bool
}

var parityCases = []parityCase{
	{name: "routed", raw: "GET /p HTTP/1.1\r\nHost: productpage.bookinfo.svc.cluster.local\r\n\r\n"},
	{name: "unknown host", raw: "GET / HTTP/1.1\r\nHost: nowhere.example.internal\r\n\r\n"},
	// Go's HTTP server answers a request without Host before the data plane sees it.
	{name: "no host", raw: "GET / HTTP/1.1\r\n\r\n", bodyPrefix: "", headersDiffer: true},
	{name: "http/1.0", raw: "GET / HTTP/1.0\r\nHost: productpage.bookinfo.svc.cluster.local\r\n\r\n"},
	{name: "rbac denied", from: "127.0.0.2", raw: "GET / HTTP/1.1\r\nHost: details.bookinfo.svc.cluster.local\r\n\r\n"},
	{name: "wrong sidecar identity", raw: "GET / HTTP/1.1\r\nHost: impostor.bookinfo.svc.cluster.local\r\n\r\n",
		bodyPrefix: "upstream connect error or disconnect/reset before headers. "},
	{name: "post with body", raw: "POST /p HTTP/1.1\r\nHost: productpage.bookinfo.svc.cluster.local\r\nContent-Length: 5\r\n\r\nhello"},
	{name: "chunked body", raw: "POST /p HTTP/1.1\r\nHost: productpage.bookinfo.svc.cluster.local\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
	{name: "h2 service", port: "h2", raw: "GET /r HTTP/1.1\r\nHost: ratings.bookinfo.svc.cluster.local\r\n\r\n"},
	// Client faults: 400 for a malformed body, 431 past Envoy's default header limits (a request
	// head of 60 KiB, 100 headers), all answered by the proxy itself.
	{name: "malformed chunked body", raw: "POST /p HTTP/1.1\r\nHost: productpage.bookinfo.svc.cluster.local\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"},
	{name: "head of 60 KiB", raw: paddedHead(60<<10, 2)},
	{name: "head over 60 KiB", raw: paddedHead(60<<10+1, 2)},
	{name: "100 headers", raw: paddedHead(2<<10, 100)},
	{name: "101 headers", raw: paddedHead(2<<10, 101)},
}

// paddedHead is a GET to productpage whose request head (request line, header lines, blank line)
// is size bytes, in n headers with Host.
func paddedHead(size, n int) string {
	var b strings.Builder
	b.WriteString("GET /p HTTP/1.1\r\nHost: productpage.bookinfo.svc.cluster.local\r\n")
	for i := 1; i < n-1; i++ {
		fmt.Fprintf(&b, "X-H%d: v\r\n", i)
	}
	b.WriteString("X-Pad: " + strings.Repeat("p", size-b.Len()-len("X-Pad: \r\n\r\n")) + "\r\n\r\n")
	return b.String()
}

// parityAnswer is what a VM sees of an answer.
type parityAnswer struct {
	status  int
	headers map[string]string // the headers a proxy may add or change
	body    string
}

// parityHeaders are the response headers compared: those a proxy adds or rewrites.
var parityHeaders = []string{"Server", "Content-Type", "X-Envoy-Upstream-Service-Time", "Connection", "Via"}

func (e *env) answer(c parityCase) (parityAnswer, error) {
	port := e.ports.http
	if c.port == "h2" {
		port = e.ports.h2
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	if c.from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(c.from)}
	}
	conn, err := d.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return parityAnswer{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, c.raw); err != nil {
		return parityAnswer{}, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return parityAnswer{}, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	a := parityAnswer{status: resp.StatusCode, headers: map[string]string{}}
	for _, h := range parityHeaders {
		if v := resp.Header.Get(h); v != "" {
			a.headers[h] = v
		}
	}
	if resp.StatusCode == 200 {
		// The sidecar's report differs by serial and port; what matters is who answered.
		a.body = "service=" + strings.Fields(string(body))[0]
	} else {
		a.body = string(body)
	}
	return a, nil
}

// TestDataPlaneParity sends the same requests through Envoy and the built-in data plane, each in
// front of its own Go mesh, and compares status, the proxy-set headers and the body.
func TestDataPlaneParity(t *testing.T) {
	b := start(t, goMesh, builtin)
	en := start(t, goMesh, envoyDataplane(t))
	for _, c := range parityCases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			b.t, en.t = t, t
			ab, errB := b.answer(c)
			ae, errE := en.answer(c)
			if (errB != nil) != (errE != nil) {
				t.Fatalf("builtin: %v %v; envoy: %v %v", ab, errB, ae, errE)
			}
			sameBody := ab.body == ae.body
			if c.bodyPrefix != "" || c.headersDiffer {
				sameBody = strings.HasPrefix(ab.body, c.bodyPrefix) && strings.HasPrefix(ae.body, c.bodyPrefix)
			}
			sameHeaders := c.headersDiffer || fmt.Sprint(ab.headers) == fmt.Sprint(ae.headers)
			if ab.status != ae.status || !sameHeaders || !sameBody {
				t.Errorf("differ:\n builtin %d %v %q\n envoy   %d %v %q", ab.status, ab.headers, ab.body, ae.status, ae.headers, ae.body)
			}
		})
	}
}

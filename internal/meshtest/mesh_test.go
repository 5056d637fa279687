package meshtest

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	fleetID       = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	productpageID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
	mysqlID       = "spiffe://cluster.local/ns/bookinfo/sa/mysql"
)

func TestSNIRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		sni  string
		want Target
	}{
		{"outbound_.9080_._.reviews.default.svc.cluster.local", Target{Host: "reviews.default.svc.cluster.local", Port: 9080}},
		{"outbound_.9080_.v2_.reviews.default.svc.cluster.local", Target{Host: "reviews.default.svc.cluster.local", Port: 9080, Subset: "v2"}},
	} {
		got, err := ParseSNI(tc.sni)
		if err != nil || got != tc.want {
			t.Errorf("ParseSNI(%q) = %+v, %v; want %+v", tc.sni, got, err, tc.want)
		}
		if got.SNI() != tc.sni {
			t.Errorf("SNI() = %q, want %q", got.SNI(), tc.sni)
		}
	}
	for _, bad := range []string{"", "reviews.default.svc.cluster.local", "outbound_.x_._.a", "inbound_.9080_._.a", "outbound_.9080_._.", "outbound_.0_._.a", "outbound_.9080_.a"} {
		if _, err := ParseSNI(bad); err == nil {
			t.Errorf("ParseSNI(%q) accepted", bad)
		}
	}
}

type fixture struct {
	ca   *CA
	leaf *Leaf
	gw   *Gateway
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ca, err := NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := StartGateway("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Close() })
	return &fixture{ca: ca, leaf: leaf, gw: gw}
}

func (f *fixture) sidecar(t *testing.T, o SidecarOptions, target Target) *Sidecar {
	t.Helper()
	o.CA = f.ca
	s, err := StartSidecar(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	f.gw.Route(target, s.Addr())
	return s
}

func get(t *testing.T, c *http.Client, url, host string) (int, Report) {
	t.Helper()
	return getWith(t, c, url, host, nil)
}

func getWith(t *testing.T, c *http.Client, url, host string, hdr http.Header) (int, Report) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return resp.StatusCode, Report{}
	}
	r, err := ParseReport(string(body))
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, r
}

// meshHTTPVersions are the two ways a client speaks HTTP over Istio mTLS: the ALPN it offers, whether
// it speaks HTTP/2, and the protocol the sidecar must report.
var meshHTTPVersions = []struct {
	alpn  []string
	h2    bool
	proto string
}{
	{[]string{"istio-http/1.1"}, false, "HTTP/1.1"},
	{[]string{"istio-h2"}, true, "HTTP/2.0"},
}

func TestGatewayAndHTTPSidecar(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	side := f.sidecar(t, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, Protocol: HTTP}, target)

	for _, tc := range meshHTTPVersions {
		conf, err := ClientTLS(f.leaf, f.ca, target, tc.alpn, productpageID)
		if err != nil {
			t.Fatal(err)
		}
		c := MeshHTTPClient(f.gw.Addr(), conf, tc.h2)
		code, r := get(t, c, "http://productpage/x", "productpage.bookinfo.svc.cluster.local")
		if code != 200 {
			t.Fatalf("%v: status %d", tc.alpn, code)
		}
		if r.Service != "productpage" || r.Caller != fleetID || r.SNI != target.SNI() || !slices.Equal(r.ALPN, tc.alpn) || r.Proto != tc.proto || !r.Verified {
			t.Errorf("%v: report %+v", tc.alpn, r)
		}
		if r.Serial != f.leaf.Cert.SerialNumber.Text(16) {
			t.Errorf("serial %s, want %s", r.Serial, f.leaf.Cert.SerialNumber.Text(16))
		}
		if r.Fields["path"] != "/x" || r.Host != "productpage.bookinfo.svc.cluster.local" {
			t.Errorf("path/host: %+v", r.Fields)
		}
		c.CloseIdleConnections()
	}
	if st := f.gw.Stats(); st.Routed < 2 || st.Refused != 0 {
		t.Errorf("gateway stats %+v", st)
	}
	if st := side.Stats(); st.Handshakes < 2 || st.Served != 2 || st.Rejected != 0 {
		t.Errorf("sidecar stats %+v", st)
	}
	if f.gw.LastSNI() != target.SNI() {
		t.Errorf("gateway saw SNI %q", f.gw.LastSNI())
	}
}

// checkXFCC asserts the XFCC an application saw: what its caller sent (prior, "" for none), then
// the sidecar's own entry for caller, which names the sidecar (By), the caller's certificate (Hash,
// Subject) and, when withURI, the caller's SPIFFE ID.
func checkXFCC(t *testing.T, r Report, prior string, by string, caller *x509.Certificate, withURI bool) {
	t.Helper()
	elems, err := ParseXFCC(r.XFCC)
	if err != nil {
		t.Fatal(err)
	}
	want := 1
	if prior != "" {
		want = 2
		if !strings.HasPrefix(r.XFCC, prior+",") {
			t.Errorf("XFCC %q does not start with the caller's %q", r.XFCC, prior)
		}
	}
	if len(elems) != want {
		t.Fatalf("XFCC %q has %d elements, want %d", r.XFCC, len(elems), want)
	}
	own := elems[len(elems)-1]
	sum := sha256.Sum256(caller.Raw)
	if !slices.Equal(own["By"], []string{by}) || !slices.Equal(own["Hash"], []string{hex.EncodeToString(sum[:])}) ||
		!slices.Equal(own["Subject"], []string{""}) {
		t.Errorf("the sidecar's XFCC entry %v, want By=%s, the caller's hash and empty subject", own, by)
	}
	if withURI && !slices.Equal(own["URI"], []string{SPIFFEID(caller)}) || !withURI && own["URI"] != nil {
		t.Errorf("the sidecar's XFCC entry has URI %q", own["URI"])
	}
}

// The HTTP sidecar appends its XFCC entry after the caller's (APPEND_FORWARD) and reports what the
// application received.
func TestHTTPSidecarAppendsXFCC(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	f.sidecar(t, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, Protocol: HTTP}, target)
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio-http/1.1"}, productpageID)
	if err != nil {
		t.Fatal(err)
	}
	c := MeshHTTPClient(f.gw.Addr(), conf, false)
	defer c.CloseIdleConnections()
	_, r := getWith(t, c, "http://productpage/", target.Host, http.Header{"X-Request-Id": {"id 1+2"}, "X-Custom": {"v"}})
	checkXFCC(t, r, "", productpageID, f.leaf.Cert, true)
	if r.RequestID != "id 1+2" || !slices.Contains(r.Headers, "x-custom") || !slices.Contains(r.Headers, "x-forwarded-client-cert") {
		t.Errorf("request id %q, headers %q", r.RequestID, r.Headers)
	}
	prior := `By=spiffe://cluster.local/ns/x/sa/y;Subject="CN=a,O=b";URI=spiffe://cluster.local/ns/payments/sa/admin`
	_, r = getWith(t, c, "http://productpage/", target.Host, http.Header{"X-Forwarded-Client-Cert": {prior}})
	checkXFCC(t, r, prior, productpageID, f.leaf.Cert, true)
	if elems, _ := ParseXFCC(r.XFCC); elems[0]["Subject"][0] != "CN=a,O=b" {
		t.Errorf("quoted subject parsed as %q", elems[0]["Subject"])
	}
}

func TestSidecarRefusesNonMeshClients(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	side := f.sidecar(t, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, Protocol: HTTP}, target)

	// Leaf without its intermediate: the sidecar trusts only the root.
	noInter := &Leaf{ChainPEM: f.leaf.ChainPEM[:len(f.leaf.ChainPEM)-len(f.ca.IntermediatePEM)], KeyPEM: f.leaf.KeyPEM, Cert: f.leaf.Cert}
	otherCA, err := NewCA("other")
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := otherCA.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		leaf *Leaf
		alpn []string
	}{
		{"no client certificate", nil, []string{"istio-http/1.1"}},
		{"no intermediate sent", noInter, []string{"istio-http/1.1"}},
		{"chain to another root", foreign, []string{"istio-http/1.1"}},
		{"no Istio ALPN", f.leaf, []string{"h2", "http/1.1"}},
		{"no ALPN", f.leaf, nil},
	}
	for _, tc := range cases {
		conf, err := ClientTLS(tc.leaf, f.ca, target, tc.alpn, productpageID)
		if err != nil {
			t.Fatal(err)
		}
		c := MeshHTTPClient(f.gw.Addr(), conf, false)
		req, err := http.NewRequest("GET", "http://productpage/", nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp, err := c.Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("%s: got status %d, want a failed handshake", tc.name, resp.StatusCode)
		}
	}
	// The sidecar counts a refusal after its alert is sent, so the client can see it first.
	Eventually(t, 5*time.Second, "the sidecar has counted every refused handshake", func() bool {
		return side.Stats().Rejected >= int64(len(cases))
	})
	if st := side.Stats(); st.Served != 0 || st.Rejected != int64(len(cases)) {
		t.Errorf("sidecar stats %+v, last error %q", st, side.LastError())
	}

	// The client checks the sidecar's identity too.
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio-http/1.1"}, "spiffe://cluster.local/ns/bookinfo/sa/someone-else")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DialMesh(context.Background(), f.gw.Addr(), conf); err == nil || !strings.Contains(err.Error(), "server identity") {
		t.Errorf("wrong server identity: err %v", err)
	}
}

func TestGatewayClosesUnknownSNI(t *testing.T) {
	f := newFixture(t)
	known := Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	f.sidecar(t, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, Protocol: HTTP}, known)
	for _, target := range []Target{
		{Host: "productpage.bookinfo.svc.cluster.local", Port: 9081},
		{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080, Subset: "v9"},
		{Host: "ratings.bookinfo.svc.cluster.local", Port: 9080},
	} {
		conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio-http/1.1"}, productpageID)
		if err != nil {
			t.Fatal(err)
		}
		if c, err := DialMesh(context.Background(), f.gw.Addr(), conf); err == nil {
			c.Close()
			t.Errorf("%s: handshake succeeded through the gateway", target)
		}
	}
	// Not TLS at all.
	c, err := net.Dial("tcp", f.gw.Addr())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 10)); n != 0 || err == nil {
		t.Errorf("plain HTTP to the gateway: read %d bytes, err %v", n, err)
	}
	c.Close()
	if st := f.gw.Stats(); st.Routed != 0 || st.Refused != 4 {
		t.Errorf("gateway stats %+v", st)
	}
	f.gw.Unroute(known)
	conf, err := ClientTLS(f.leaf, f.ca, known, []string{"istio-http/1.1"}, productpageID)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := DialMesh(context.Background(), f.gw.Addr(), conf); err == nil {
		c.Close()
		t.Error("unrouted target still reachable")
	}
}

// A client offering only istio (what fwdproxy offers) gets the application's bytes and nothing
// else: no ALPN is negotiated, so no metadata exchange.
func TestTCPSidecarWithoutPeerExchange(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "mysql.bookinfo.svc.cluster.local", Port: 3306}
	f.sidecar(t, SidecarOptions{Name: "mysql", SPIFFEID: mysqlID, Protocol: TCP}, target)
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio"}, mysqlID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := DialMesh(context.Background(), f.gw.Addr(), conf)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if p := c.ConnectionState().NegotiatedProtocol; p != "" {
		t.Errorf("negotiated %q, want none (the sidecar offers istio-peer-exchange, h2, http/1.1)", p)
	}
	first, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.HasPrefix(first, "service=mysql ") {
		t.Errorf("first bytes %q, %v; want the application's report line", first, err)
	}
}

func TestTCPSidecarEchoes(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "mysql.bookinfo.svc.cluster.local", Port: 3306}
	f.sidecar(t, SidecarOptions{Name: "mysql", SPIFFEID: mysqlID, Protocol: TCP}, target)
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio-peer-exchange", "istio"}, mysqlID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := DialMesh(context.Background(), f.gw.Addr(), conf)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	// Istio's own clients offer istio-peer-exchange: the sidecar's metadata comes first.
	md, err := ReadPeerExchange(br)
	if err != nil {
		t.Fatalf("metadata exchange header: %v", err)
	}
	if md.GetFields()["NAME"].GetStringValue() != "mysql" {
		t.Errorf("exchanged metadata %v", md)
	}
	r, err := ReadReportLine(br)
	if err != nil {
		t.Fatal(err)
	}
	if r.Service != "mysql" || r.Caller != fleetID || r.SNI != target.SNI() || !slices.Equal(r.ALPN, []string{"istio-peer-exchange", "istio"}) {
		t.Errorf("report %+v", r)
	}
	msg := strings.Repeat("ping ", 10000) + "\n"
	go io.WriteString(c, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != msg {
		t.Fatalf("echo: %v (%d bytes)", err, len(got))
	}
	// Half-close: the sidecar finishes and closes its side.
	c.CloseWrite()
	if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("after half-close: %d, %v", n, err)
	}
}

func TestSidecarAllowedCallers(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	side := f.sidecar(t, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, Protocol: HTTP, AllowedCallers: []string{"spiffe://cluster.local/ns/x/sa/y"}}, target)
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio-http/1.1"}, productpageID)
	if err != nil {
		t.Fatal(err)
	}
	if code, _ := get(t, MeshHTTPClient(f.gw.Addr(), conf, false), "http://p/", "p"); code != http.StatusForbidden {
		t.Errorf("status %d, want 403", code)
	}
	if st := side.Stats(); st.Denied != 1 || st.Served != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestGatewayCloseCutsConnections(t *testing.T) {
	f := newFixture(t)
	target := Target{Host: "mysql.bookinfo.svc.cluster.local", Port: 3306}
	f.sidecar(t, SidecarOptions{Name: "mysql", SPIFFEID: mysqlID, Protocol: TCP}, target)
	conf, err := ClientTLS(f.leaf, f.ca, target, []string{"istio"}, mysqlID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := DialMesh(context.Background(), f.gw.Addr(), conf)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	if _, err := ReadReportLine(br); err != nil {
		t.Fatal(err)
	}
	f.gw.Close()
	if _, err := br.ReadByte(); err == nil {
		t.Error("connection survived the gateway's close")
	}
	if _, err := net.DialTimeout("tcp", f.gw.Addr(), time.Second); err == nil {
		t.Error("closed gateway still accepts")
	}
}

func TestPeekClientHelloKeepsBytes(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	var sent []byte
	rec := &writeRecorder{Conn: a, out: &sent}
	go func() {
		_ = tls.Client(rec, &tls.Config{ServerName: "outbound_.1_._.a.b", NextProtos: []string{"istio"}, InsecureSkipVerify: true}).Handshake()
	}()
	hello, raw, err := PeekClientHello(b)
	if err != nil {
		t.Fatal(err)
	}
	if hello.ServerName != "outbound_.1_._.a.b" || !slices.Equal(hello.ALPN, []string{"istio"}) {
		t.Errorf("hello %+v", hello)
	}
	if string(raw) != string(sent) || len(raw) < 50 || raw[0] != 0x16 {
		t.Errorf("raw bytes (%d) differ from sent (%d)", len(raw), len(sent))
	}
}

type writeRecorder struct {
	net.Conn
	out *[]byte
}

func (w *writeRecorder) Write(p []byte) (int, error) {
	*w.out = append(*w.out, p...)
	return w.Conn.Write(p)
}

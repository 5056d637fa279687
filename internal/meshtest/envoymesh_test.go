//go:build linux

package meshtest

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

const deniedCaller = "spiffe://cluster.local/ns/bookinfo/sa/only-this-one"

// envoyStandIns is an Envoy east-west gateway in front of one Envoy playing three sidecars:
// productpage (HTTP), mysql (TCP) and details (HTTP, allowing only deniedCaller).
type envoyStandIns struct {
	*fixture
	dir      string
	gw       *Process
	sidecars *EnvoySidecars
	addrs    map[string]string // sidecar name -> its listener
	targets  map[string]Target
}

func startEnvoyStandIns(t *testing.T) *envoyStandIns {
	t.Helper()
	if _, err := EnvoyPath(); err != nil {
		t.Fatal(err)
	}
	ca, err := NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	m := &envoyStandIns{fixture: &fixture{ca: ca, leaf: leaf}, dir: t.TempDir(), addrs: map[string]string{}, targets: map[string]Target{}}
	routes := map[Target]string{}
	var opts []SidecarOptions
	for _, s := range []struct {
		name, id, proto string
		port            uint32
		allowed         []string
	}{
		{"productpage", productpageID, HTTP, 9080, nil},
		{"mysql", mysqlID, TCP, 3306, nil},
		{"details", "spiffe://cluster.local/ns/bookinfo/sa/details", HTTP, 9080, []string{deniedCaller}},
	} {
		addr, err := FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, SidecarOptions{Name: s.name, SPIFFEID: s.id, CA: ca, Protocol: s.proto, Addr: addr, AllowedCallers: s.allowed})
		target := Target{Host: s.name + ".bookinfo.svc.cluster.local", Port: s.port}
		m.addrs[s.name], m.targets[s.name], routes[target] = addr, target, addr
	}
	if m.sidecars, err = StartEnvoySidecars(m.dir, opts...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.sidecars.Stop() })
	addr, err := FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	if m.gw, err = StartEnvoyGateway(m.dir, addr, routes); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.gw.Stop() })
	return m
}

func (m *envoyStandIns) sidecarStats(t *testing.T, name string) SidecarStats {
	t.Helper()
	st, err := m.sidecars.Stats(name)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (m *envoyStandIns) gatewayStats(t *testing.T) GatewayStats {
	t.Helper()
	st, err := EnvoyGatewayStats(m.gw)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// refused dials addr with conf and says why the connection carried no data, or fails the test
// if it did. In TLS 1.3 the client's handshake ends before the server has checked the client's
// chain, so a refusal can show on the first read.
// (ClientTLS sends the client's certificate whatever CAs the server names.)
func refused(t *testing.T, what, addr string, conf *tls.Config) {
	t.Helper()
	c, err := DialMesh(context.Background(), addr, conf)
	if err != nil {
		t.Logf("%s: refused in the handshake: %v", what, err)
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	// An HTTP request, so an HTTP sidecar that accepted the connection would answer.
	_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	b, err := io.ReadAll(c)
	if len(b) > 0 {
		t.Errorf("%s: got %q, want the connection refused", what, b)
		return
	}
	t.Logf("%s: refused after the handshake: %v", what, err)
}

func TestEnvoyStandIns(t *testing.T) {
	m := startEnvoyStandIns(t)
	httpT, tcpT := m.targets["productpage"], m.targets["mysql"]

	t.Run("http", func(t *testing.T) {
		before := m.sidecarStats(t, "productpage")
		for _, tc := range meshHTTPVersions {
			conf, err := ClientTLS(m.leaf, m.ca, httpT, tc.alpn, productpageID)
			if err != nil {
				t.Fatal(err)
			}
			c := MeshHTTPClient(m.gw.Addr, conf, tc.h2)
			code, r := get(t, c, "http://productpage/p", "productpage.example.internal")
			c.CloseIdleConnections()
			if code != 200 {
				t.Fatalf("%v: status %d", tc.alpn, code)
			}
			// The sidecar names the first offered ALPN it has a chain for.
			if r.Service != "productpage" || !r.Verified || r.Caller != fleetID || r.SNI != httpT.SNI() || !slices.Equal(r.ALPN, tc.alpn[:1]) || r.Proto != tc.proto {
				t.Errorf("%v: report %+v", tc.alpn, r)
			}
			if r.Host != "productpage.example.internal" || r.Fields["path"] != "/p" || r.Serial != m.leaf.Cert.SerialNumber.Text(16) || !strings.HasPrefix(r.Fields["tls"], "TLSv1.") {
				t.Errorf("%v: fields %v", tc.alpn, r.Fields)
			}
		}
		after := m.sidecarStats(t, "productpage")
		if after.Served-before.Served != int64(len(meshHTTPVersions)) || after.Handshakes-before.Handshakes < int64(len(meshHTTPVersions)) || after.Rejected != before.Rejected {
			t.Errorf("sidecar stats %+v, before %+v", after, before)
		}
	})

	t.Run("peer metadata", func(t *testing.T) {
		conf, err := ClientTLS(m.leaf, m.ca, httpT, []string{"istio-http/1.1"}, productpageID)
		if err != nil {
			t.Fatal(err)
		}
		c := MeshHTTPClient(m.gw.Addr, conf, false)
		defer c.CloseIdleConnections()
		checkPeerMetadata(t, c, "http://productpage/", "productpage.example.internal")
	})

	t.Run("xfcc", func(t *testing.T) {
		// A caller's own x-forwarded-client-cert is kept, and the sidecar appends the element
		// naming the caller's verified URI SAN; the application trusts only that last one.
		conf, err := ClientTLS(m.leaf, m.ca, httpT, []string{"istio-http/1.1"}, productpageID)
		if err != nil {
			t.Fatal(err)
		}
		c := MeshHTTPClient(m.gw.Addr, conf, false)
		defer c.CloseIdleConnections()
		req, err := http.NewRequest("GET", "http://productpage/", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("X-Forwarded-Client-Cert", `By=spiffe://x/y;URI=spiffe://cluster.local/ns/evil/sa/evil`)
		req.Header.Set("x-meshtest-peer-uri", "spiffe://cluster.local/ns/evil/sa/evil")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		r, err := ParseReport(string(body))
		if err != nil {
			t.Fatal(err)
		}
		if r.Caller != fleetID || !r.Verified {
			t.Errorf("report %+v: want the caller from the sidecar's own XFCC element", r)
		}
		elems, err := ParseXFCC(`By=spiffe://x/y;URI=spiffe://a/b, By=spiffe://cluster.local/ns/bookinfo/sa/p;Hash=ab;Subject="O=x, CN=\"y\"";URI=` + fleetID)
		if got := elems[len(elems)-1]; err != nil || len(elems) != 2 || got["URI"][0] != fleetID || got["Subject"][0] != `O=x, CN="y"` || got["Hash"][0] != "ab" {
			t.Errorf("ParseXFCC: %v, %v", elems, err)
		}
	})

	t.Run("tcp", func(t *testing.T) {
		before := m.sidecarStats(t, "mysql")
		conf, err := ClientTLS(m.leaf, m.ca, tcpT, []string{"istio-peer-exchange", "istio"}, mysqlID)
		if err != nil {
			t.Fatal(err)
		}
		c, err := DialMesh(context.Background(), m.gw.Addr, conf)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if p := c.ConnectionState().NegotiatedProtocol; p != "istio-peer-exchange" {
			t.Errorf("negotiated %q, want istio-peer-exchange", p)
		}
		br := bufio.NewReader(c)
		if md, err := ReadPeerExchange(br); err != nil || md.GetFields()["NAME"].GetStringValue() != "mysql" {
			t.Fatalf("metadata exchange header: %v, %v", md, err)
		}
		r, err := ReadReportLine(br)
		if err != nil {
			t.Fatal(err)
		}
		if r.Service != "mysql" || !r.Verified || r.Caller != fleetID || r.SNI != tcpT.SNI() || !slices.Equal(r.ALPN, []string{"istio-peer-exchange"}) || r.Serial != m.leaf.Cert.SerialNumber.Text(16) {
			t.Errorf("report %+v", r)
		}
		msg := strings.Repeat("ping ", 10000) + "\n"
		go io.WriteString(c, msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != msg {
			t.Fatalf("echo: %v (%d bytes)", err, len(got))
		}
		c.CloseWrite()
		if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Errorf("after half-close: %d, %v", n, err)
		}
		if st := m.sidecarStats(t, "mysql"); st.Served != before.Served+1 || st.Handshakes != before.Handshakes+1 {
			t.Errorf("sidecar stats %+v, before %+v", st, before)
		}
	})

	t.Run("gateway passes through", func(t *testing.T) {
		// The gateway holds no certificate: the handshake the client completes through it is
		// the sidecar's, checked against the sidecar's SPIFFE ID.
		before := m.gatewayStats(t)
		for _, alpn := range [][]string{{"istio"}, {"istio-http/1.0"}, {"h2", "istio-h2"}} {
			conf, err := ClientTLS(m.leaf, m.ca, httpT, alpn, productpageID)
			if err != nil {
				t.Fatal(err)
			}
			c, err := DialMesh(context.Background(), m.gw.Addr, conf)
			if err != nil {
				t.Fatalf("%v: %v", alpn, err)
			}
			st := c.ConnectionState()
			want := ""
			if alpn[0] == "h2" {
				want = "h2"
			}
			if SPIFFEID(st.PeerCertificates[0]) != productpageID || st.NegotiatedProtocol != want {
				t.Errorf("%v: server %s, ALPN %q", alpn, SPIFFEID(st.PeerCertificates[0]), st.NegotiatedProtocol)
			}
			c.Close()
		}
		conf, err := ClientTLS(m.leaf, m.ca, httpT, []string{"istio-http/1.1"}, "spiffe://cluster.local/ns/bookinfo/sa/someone-else")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DialMesh(context.Background(), m.gw.Addr, conf); err == nil || !strings.Contains(err.Error(), "server identity") {
			t.Errorf("wrong server identity: err %v", err)
		}
		Eventually(t, 5*time.Second, "the gateway counted the routed connections", func() bool {
			return m.gatewayStats(t).Routed-before.Routed == 4
		})
		if st := m.gatewayStats(t); st.Refused != before.Refused || st.Accepted-before.Accepted != 4 {
			t.Errorf("gateway stats %+v, before %+v", st, before)
		}
	})

	t.Run("gateway refuses", func(t *testing.T) {
		before := m.gatewayStats(t)
		side := m.sidecarStats(t, "productpage")
		cases := []struct {
			name   string
			target Target
			alpn   []string
		}{
			{"no Istio ALPN", httpT, []string{"h2", "http/1.1"}},
			{"no ALPN", httpT, nil},
			{"unknown port", Target{Host: httpT.Host, Port: 9081}, []string{"istio-http/1.1"}},
			{"unknown subset", Target{Host: httpT.Host, Port: httpT.Port, Subset: "v9"}, []string{"istio-http/1.1"}},
			{"unknown host", Target{Host: "ratings.bookinfo.svc.cluster.local", Port: 9080}, []string{"istio-http/1.1"}},
		}
		for _, tc := range cases {
			conf, err := ClientTLS(m.leaf, m.ca, tc.target, tc.alpn, productpageID)
			if err != nil {
				t.Fatal(err)
			}
			if c, err := DialMesh(context.Background(), m.gw.Addr, conf); err == nil {
				c.Close()
				t.Errorf("%s: handshake succeeded through the gateway", tc.name)
			}
		}
		c, err := net.Dial("tcp", m.gw.Addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 10)); n != 0 || err == nil {
			t.Errorf("plain HTTP to the gateway: read %d bytes, err %v", n, err)
		}
		c.Close()
		want := int64(len(cases) + 1)
		Eventually(t, 5*time.Second, "the gateway counted every refused connection", func() bool {
			return m.gatewayStats(t).Refused-before.Refused >= want
		})
		if st := m.gatewayStats(t); st.Refused-before.Refused != want || st.Routed != before.Routed {
			t.Errorf("gateway stats %+v, before %+v", st, before)
		}
		if st := m.sidecarStats(t, "productpage"); st.Handshakes != side.Handshakes || st.Rejected != side.Rejected {
			t.Errorf("a refused connection reached the sidecar: %+v, before %+v", st, side)
		}
	})

	t.Run("sidecar refuses", func(t *testing.T) {
		noInter := &Leaf{ChainPEM: m.leaf.ChainPEM[:len(m.leaf.ChainPEM)-len(m.ca.IntermediatePEM)], KeyPEM: m.leaf.KeyPEM, Cert: m.leaf.Cert}
		otherCA, err := NewCA("other")
		if err != nil {
			t.Fatal(err)
		}
		foreign, err := otherCA.IssueFor(fleetID, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		outside, err := m.ca.IssueFor("spiffe://other.example/ns/fwdproxy/sa/fwdproxy", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		lookalike, err := m.ca.IssueFor("spiffe://cluster.local.evil/ns/fwdproxy/sa/fwdproxy", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []struct {
			name, id string
			alpn     []string
		}{
			{"productpage", productpageID, []string{"istio-http/1.1"}},
			{"mysql", mysqlID, []string{"istio"}},
		} {
			before := m.sidecarStats(t, s.name)
			cases := []struct {
				name string
				leaf *Leaf
			}{
				{"no client certificate", nil},
				{"no intermediate sent", noInter},
				{"chain to another root", foreign},
				{"URI SAN outside the trust domain", outside},
				{"URI SAN in a look-alike trust domain", lookalike},
			}
			for _, tc := range cases {
				conf, err := ClientTLS(tc.leaf, m.ca, m.targets[s.name], s.alpn, s.id)
				if err != nil {
					t.Fatal(err)
				}
				refused(t, s.name+": "+tc.name, m.gw.Addr, conf)
			}
			// Not TLS, straight to the sidecar: it matches no chain (transport_protocol tls).
			c, err := net.Dial("tcp", m.addrs[s.name])
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, _ := io.ReadAll(c); len(b) > 0 {
				t.Errorf("%s: plain HTTP got %q", s.name, b)
			}
			c.Close()
			want := int64(len(cases) + 1)
			Eventually(t, 5*time.Second, s.name+" counted every refused connection", func() bool {
				return m.sidecarStats(t, s.name).Rejected-before.Rejected >= want
			})
			if st := m.sidecarStats(t, s.name); st.Rejected-before.Rejected != want || st.Served != before.Served || st.Handshakes != before.Handshakes {
				t.Errorf("%s: stats %+v, before %+v", s.name, st, before)
			}
		}
	})

	t.Run("sidecar ALPN", func(t *testing.T) {
		// Straight to the sidecars, since the gateway passes only Istio's names: the HTTP port
		// negotiates h2 and http/1.1, the TCP port istio-peer-exchange, h2 and http/1.1; any other
		// offer negotiates nothing and is still served (no ALPN condition on the chains).
		for _, tc := range []struct {
			sidecar string
			offer   []string
			want    string
		}{
			{"productpage", []string{"h2"}, "h2"},
			{"productpage", []string{"http/1.1"}, "http/1.1"},
			{"productpage", []string{"istio-peer-exchange", "istio-http/1.1"}, ""},
			{"productpage", []string{"istio-h2"}, ""},
			{"mysql", []string{"istio-peer-exchange"}, "istio-peer-exchange"},
			{"mysql", []string{"h2"}, "h2"},
			{"mysql", []string{"http/1.1"}, "http/1.1"},
			{"mysql", []string{"istio"}, ""},
		} {
			id := productpageID
			if tc.sidecar == "mysql" {
				id = mysqlID
			}
			conf, err := ClientTLS(m.leaf, m.ca, m.targets[tc.sidecar], tc.offer, id)
			if err != nil {
				t.Fatal(err)
			}
			c, err := DialMesh(context.Background(), m.addrs[tc.sidecar], conf)
			if err != nil {
				t.Errorf("%s %v: %v", tc.sidecar, tc.offer, err)
				continue
			}
			if got := c.ConnectionState().NegotiatedProtocol; got != tc.want {
				t.Errorf("%s offered %v: negotiated %q, want %q", tc.sidecar, tc.offer, got, tc.want)
			}
			if tc.sidecar == "mysql" {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				br := bufio.NewReader(c)
				if tc.want == PeerExchangeALPN {
					if _, err := ReadPeerExchange(br); err != nil {
						t.Errorf("mysql offered %v: metadata exchange header: %v", tc.offer, err)
					}
				}
				r, err := ReadReportLine(br)
				if err != nil || !slices.Equal(r.ALPN, tc.offer[:1]) {
					t.Errorf("mysql offered %v: report %+v, %v", tc.offer, r, err)
				}
			}
			c.Close()
		}
	})

	t.Run("allowed callers", func(t *testing.T) {
		conf, err := ClientTLS(m.leaf, m.ca, m.targets["details"], []string{"istio-http/1.1"}, "spiffe://cluster.local/ns/bookinfo/sa/details")
		if err != nil {
			t.Fatal(err)
		}
		c := MeshHTTPClient(m.gw.Addr, conf, false)
		defer c.CloseIdleConnections()
		if code, _ := get(t, c, "http://details/", "details"); code != http.StatusForbidden {
			t.Errorf("HTTP: status %d, want 403", code)
		}
		Eventually(t, 5*time.Second, "details counted the denied caller", func() bool { return m.sidecarStats(t, "details").Denied == 1 })
		if st := m.sidecarStats(t, "details"); st.Served != 0 || st.Handshakes != 1 {
			t.Errorf("details: stats %+v", st)
		}
		// The caller the policy names is served.
		allowed, err := m.ca.IssueFor(deniedCaller, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		conf, err = ClientTLS(allowed, m.ca, m.targets["details"], []string{"istio-http/1.1"}, "spiffe://cluster.local/ns/bookinfo/sa/details")
		if err != nil {
			t.Fatal(err)
		}
		c2 := MeshHTTPClient(m.gw.Addr, conf, false)
		defer c2.CloseIdleConnections()
		if code, r := get(t, c2, "http://details/", "details"); code != 200 || r.Caller != deniedCaller {
			t.Errorf("allowed caller: status %d, report %+v", code, r)
		}
		// Envoy's network RBAC decides on the caller's first bytes, after a server-first
		// application has spoken: a TCP sidecar takes no AllowedCallers.
		_, err = StartEnvoySidecars(t.TempDir(), SidecarOptions{Name: "redis", SPIFFEID: mysqlID, CA: m.ca, Protocol: TCP, Addr: "127.0.0.1:1", AllowedCallers: []string{deniedCaller}})
		if err == nil || !strings.Contains(err.Error(), "HTTP only") {
			t.Errorf("TCP sidecar with AllowedCallers: %v", err)
		}
	})

	t.Run("gateway down", func(t *testing.T) {
		conf, err := ClientTLS(m.leaf, m.ca, tcpT, []string{"istio"}, mysqlID)
		if err != nil {
			t.Fatal(err)
		}
		c, err := DialMesh(context.Background(), m.gw.Addr, conf)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		if _, err := ReadReportLine(br); err != nil {
			t.Fatal(err)
		}
		m.gw.Stop()
		if _, err := br.ReadByte(); err == nil {
			t.Error("connection survived the gateway's stop")
		}
		if _, err := net.DialTimeout("tcp", m.gw.Addr, time.Second); err == nil {
			t.Error("stopped gateway still accepts")
		}
	})
}

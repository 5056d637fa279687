//go:build linux

package meshtest

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// debianMesh starts HAProxy (gateway and HTTP sidecar) and nginx (TCP sidecar). A missing binary
// fails the test with the package to install: CI installs them.
func debianMesh(t *testing.T) (f *fixture, gw string, httpT, tcpT Target) {
	t.Helper()
	ca, err := NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.IssueFor(fleetID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	addrs := make([]string, 3)
	for i := range addrs {
		if addrs[i], err = FreeAddr(); err != nil {
			t.Fatal(err)
		}
	}
	httpT = Target{Host: "productpage.bookinfo.svc.cluster.local", Port: 9080}
	tcpT = Target{Host: "mysql.bookinfo.svc.cluster.local", Port: 3306}
	hs, err := StartHAProxySidecars(dir, SidecarOptions{Name: "productpage", SPIFFEID: productpageID, CA: ca, Protocol: HTTP, Addr: addrs[0]})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hs.Stop() })
	ns, err := StartNginxSidecar(dir, SidecarOptions{Name: "mysql", SPIFFEID: mysqlID, CA: ca, Protocol: TCP, Addr: addrs[1]})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Stop() })
	g, err := StartHAProxyGateway(dir, addrs[2], map[Target]string{httpT: hs.Addr, tcpT: ns.Addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Stop() })
	return &fixture{ca: ca, leaf: leaf}, g.Addr, httpT, tcpT
}

func TestDebianStandIns(t *testing.T) {
	f, gw, httpT, tcpT := debianMesh(t)

	t.Run("http", func(t *testing.T) {
		for _, tc := range meshHTTPVersions {
			conf, err := ClientTLS(f.leaf, f.ca, httpT, tc.alpn, productpageID)
			if err != nil {
				t.Fatal(err)
			}
			c := MeshHTTPClient(gw, conf, tc.h2)
			code, r := get(t, c, "http://productpage/p", "productpage.example.internal")
			if code != 200 {
				t.Fatalf("%v: status %d", tc.alpn, code)
			}
			if r.Service != "productpage" || !r.Verified || r.Caller != fleetID || r.SNI != httpT.SNI() || !slices.Equal(r.ALPN, tc.alpn) || r.Proto != tc.proto {
				t.Errorf("%v: report %+v", tc.alpn, r)
			}
			if r.Host != "productpage.example.internal" || r.Fields["path"] != "/p" || r.Serial != f.leaf.Cert.SerialNumber.Text(16) {
				t.Errorf("%v: fields %v", tc.alpn, r.Fields)
			}
			// HAProxy appends its XFCC entry, without the caller's URI, which it cannot read.
			checkXFCC(t, r, "", productpageID, f.leaf.Cert, false)
			prior := "URI=spiffe://cluster.local/ns/payments/sa/admin"
			_, r = getWith(t, c, "http://productpage/p", "productpage.example.internal", http.Header{"X-Forwarded-Client-Cert": {prior}, "X-Request-Id": {"id 1+2"}})
			checkXFCC(t, r, prior, productpageID, f.leaf.Cert, false)
			if r.RequestID != "id 1+2" || !slices.Contains(r.Headers, "x-request-id") {
				t.Errorf("%v: request id %q, headers %q", tc.alpn, r.RequestID, r.Headers)
			}
			checkPeerMetadata(t, c, "http://productpage/p", "productpage.example.internal")
			c.CloseIdleConnections()
		}
	})

	t.Run("tcp", func(t *testing.T) {
		conf, err := ClientTLS(f.leaf, f.ca, tcpT, []string{"istio-peer-exchange", "istio"}, mysqlID)
		if err != nil {
			t.Fatal(err)
		}
		c, err := DialMesh(context.Background(), gw, conf)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		r, err := ReadReportLine(bufio.NewReader(c))
		if err != nil {
			t.Fatal(err)
		}
		if r.Service != "mysql" || !r.Verified || r.Caller != fleetID || r.SNI != tcpT.SNI() || len(r.ALPN) != 1 || !slices.Contains([]string{"istio-peer-exchange", "istio"}, r.ALPN[0]) {
			t.Errorf("report %+v", r)
		}
	})

	t.Run("refused", func(t *testing.T) {
		noInter := &Leaf{ChainPEM: f.leaf.ChainPEM[:len(f.leaf.ChainPEM)-len(f.ca.IntermediatePEM)], KeyPEM: f.leaf.KeyPEM}
		for _, tc := range []struct {
			name   string
			target Target
			leaf   *Leaf
			alpn   []string
		}{
			{"http: no intermediate", httpT, noInter, []string{"istio-http/1.1"}},
			{"http: no client cert", httpT, nil, []string{"istio-http/1.1"}},
			{"tcp: no intermediate", tcpT, noInter, []string{"istio"}},
			{"tcp: no Istio ALPN", tcpT, f.leaf, []string{"h2"}},
			{"unknown SNI", Target{Host: "ratings.bookinfo.svc.cluster.local", Port: 9080}, f.leaf, []string{"istio-http/1.1"}},
		} {
			id := productpageID
			if tc.target == tcpT {
				id = mysqlID
			}
			conf, err := ClientTLS(tc.leaf, f.ca, tc.target, tc.alpn, id)
			if err != nil {
				t.Fatal(err)
			}
			if tc.target == httpT {
				req, err := http.NewRequest("GET", "http://productpage/", nil)
				if err != nil {
					t.Fatal(err)
				}
				if resp, err := MeshHTTPClient(gw, conf, false).Do(req); err == nil {
					resp.Body.Close()
					t.Errorf("%s: status %d, want a refused connection", tc.name, resp.StatusCode)
				}
				continue
			}
			c, err := DialMesh(context.Background(), gw, conf)
			if err != nil {
				continue // refused in the handshake
			}
			// TLS 1.3: the server checks the client's chain after the client's handshake ends.
			c.SetDeadline(time.Now().Add(5 * time.Second))
			b, err := io.ReadAll(c)
			c.Close()
			if err == nil && len(b) > 0 {
				t.Errorf("%s: got %q", tc.name, b)
			}
		}
	})
}

func TestLookPathSaysWhatToInstall(t *testing.T) {
	_, err := LookPath("fwdproxy-no-such-binary", "fwdproxy-no-such-package")
	if err == nil || !strings.Contains(err.Error(), "apt-get install -y fwdproxy-no-such-package") {
		t.Errorf("err %v, want a hint to install the package", err)
	}
	if p, err := LookPath("haproxy", "haproxy"); err != nil || !filepath.IsAbs(p) {
		t.Errorf("haproxy: %q %v", p, err)
	}
}

package config

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func TestExampleConfig(t *testing.T) {
	c, err := Load("../../examples/config.yaml")
	if err != nil {
		t.Fatalf("example config rejected: %v", err)
	}
	if c.Gateways[1].Port != 15443 {
		t.Errorf("gateway port default = %d", c.Gateways[1].Port)
	}
	if c.Upstream.ConnectTimeout != 5*time.Second || c.Dataplane != "builtin" || c.XDS.Socket != DefaultXDSSocket || c.XDS.Address != "" ||
		c.Listen.MaxRequestHeadersKB != 60 || c.Listen.MaxHeadersCount != 100 || c.Listen.MaxConnections != 10000 {
		t.Errorf("defaults: %+v", c)
	}
	if got := c.Path("catalog.yaml"); !strings.HasSuffix(got, "examples/catalog.yaml") {
		t.Errorf("relative path resolved to %q", got)
	}
}

func TestConfigErrors(t *testing.T) {
	base := `
mesh: {trustDomain: cluster.local}
gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
`
	if _, err := Parse("c.yaml", []byte(base)); err != nil {
		t.Fatalf("base config rejected: %v", err)
	}
	cases := []struct{ name, doc, want string }{
		{"no gateways", strings.Replace(base, "gateways: [{name: gw, address: 10.0.0.1}]", "", 1), "gateways: at least one east-west gateway is required"},
		{"bad gateway address", strings.Replace(base, "10.0.0.1", "not_a host", 1), `c.yaml:3: gateways[0].address: "not_a host" is neither an IP address nor a DNS name`},
		{"fractional gateway port", strings.Replace(base, "address: 10.0.0.1}", "address: 10.0.0.1, port: 15443.5}", 1), "c.yaml:3: gateways[0].port: 15443.5 is not an integer"},
		{"quoted outlier count", base + "upstream: {outlierDetection: {consecutiveErrors: \"5\"}}\n", `c.yaml:7: upstream.outlierDetection.consecutiveErrors: "5" is a string; the field wants an integer`},
		{"bad gateway port", strings.Replace(base, "address: 10.0.0.1}", "address: 10.0.0.1, port: 70000}", 1), "gateways[0].port: 70000 is not a valid port"},
		{"trust domain mismatch", strings.Replace(base, "spiffe://cluster.local/ns", "spiffe://other.org/ns", 1), `identity.spiffeID: trust domain "other.org" differs from mesh.trustDomain "cluster.local"`},
		{"missing key", strings.Replace(base, "privateKey: k.pem, ", "", 1), "identity.files.privateKey: required"},
		{"unknown field", base + "xds: {adress: 1}\n", `c.yaml:7: xds.adress: unknown field "adress"; did you mean "address"?`},
		{"bad duration", base + "upstream: {connectTimeout: fast}\n", "c.yaml:7:"},
		{"bad xds address", base + "xds: {address: localhost, tls: {certChain: a, privateKey: b, clientCA: c}}\n", `xds.address: "localhost" is not host:port`},
		{"bad dataplane", base + "dataplane: nginx\n", `dataplane: "nginx" is not a data plane; use builtin or envoy`},
		{"envoy without binary", base + "dataplane: envoy\n", "envoy.binary: required with dataplane: envoy"},
		{"envoy admin off loopback", base + "envoy: {binary: envoy, adminAddress: 0.0.0.0:15000}\n", `c.yaml:7: envoy.adminAddress: "0.0.0.0:15000" is not a loopback address`},
		{"envoy admin host name", base + "envoy: {adminAddress: \"localhost:15000\"}\n", `envoy.adminAddress: "localhost:15000": Envoy needs an IP address there`},
		{"bad listen", base + "listen: {address: any}\n", `listen.address: "any" is not an IP address`},
		{"header limit too large", base + "listen: {maxRequestHeadersKB: 9000}\n", "listen.maxRequestHeadersKB: 9000 is over 8192"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not contain %q", err, tc.want)
			}
		})
	}
}

func TestEmptyOrSeveralDocuments(t *testing.T) {
	base := `gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
`
	cases := []struct{ name, doc, want string }{
		{"empty", "", "c.yaml: the config file is empty"},
		{"only comments", "# TODO\n", "c.yaml: the config file is empty"},
		{"null", "---\n~\n", "c.yaml: the config file is empty"},
		{"second document", base + "---\nxds: {address: 127.0.0.1:18001}\n", "c.yaml:5: a second YAML document starts here"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not contain %q", err, tc.want)
			}
		})
	}
}

func TestReservedPorts(t *testing.T) {
	base := `gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
`
	cases := []struct {
		name, extra string
		want        []string // "port field", sorted by port
	}{
		// xDS and the admin API are Unix sockets unless a TCP address (with authentication) is set.
		{"defaults on 0.0.0.0", "", []string{"9102 metrics.address"}},
		{"gossip and envoy admin", "peers: {bind: 0.0.0.0:7946, allowUnencrypted: true}\ndataplane: envoy\nenvoy: {binary: envoy}\n",
			[]string{"7946 peers.bind", "9102 metrics.address", "15000 envoy.adminAddress"}},
		{"envoy admin unused by the built-in data plane", "envoy: {adminAddress: 127.0.0.1:15001}\ndataplane: builtin\n", []string{"9102 metrics.address"}},
		{"listeners on another address", "listen: {address: 10.0.0.5}\nmetrics: {address: 127.0.0.1:9102}\n", nil},
		{"same address", "listen: {address: 10.0.0.5}\nmetrics: {address: 10.0.0.5:9102}\n", []string{"9102 metrics.address"}},
		{"ephemeral ports", "metrics: {address: 127.0.0.1:0}\n", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("c.yaml", []byte(base+tc.extra))
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range c.CatalogOptions().Reserved {
				got = append(got, fmt.Sprintf("%d %s", r.Port, r.Field))
			}
			if strings.Join(got, ", ") != strings.Join(tc.want, ", ") {
				t.Fatalf("reserved %v, want %v", got, tc.want)
			}
		})
	}
}

func TestMissingFile(t *testing.T) {
	_, err := Load(os.DevNull + "/nope.yaml")
	if err == nil || !strings.Contains(err.Error(), "read config") {
		t.Fatalf("err = %v", err)
	}
}

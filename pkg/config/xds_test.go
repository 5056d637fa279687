package config

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestXDSDefaults(t *testing.T) {
	c, err := Parse("/etc/fwdproxy/c.yaml", []byte(peersBase))
	if err != nil {
		t.Fatal(err)
	}
	if c.XDS.Socket != "/run/fwdproxy/xds.sock" || c.XDS.Group != "" || c.XDS.Address != "" || c.XDS.TLS != nil {
		t.Fatalf("xds defaults: %+v", c.XDS)
	}
	if c.Admin.Socket != "/run/fwdproxy/admin.sock" || c.Admin.Address != "" {
		t.Fatalf("admin defaults: %+v", c.Admin)
	}
	c, err = Parse("/srv/fp/c.yaml", []byte(peersBase+"xds: {socket: run/xds.sock, group: envoy}\nadmin: {socket: /run/fp/admin.sock, group: '998'}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.XDSSocket() != filepath.FromSlash("/srv/fp/run/xds.sock") || c.AdminSocket() != "/run/fp/admin.sock" {
		t.Fatalf("sockets resolved to %s and %s", c.XDSSocket(), c.AdminSocket())
	}
	withTLS := "xds: {address: '0.0.0.0:18000', tls: {certChain: xds.pem, privateKey: xds-key.pem, clientCA: dataplanes-ca.pem}}\n"
	if _, err := Parse("c.yaml", []byte(peersBase+withTLS)); err != nil {
		t.Fatalf("TCP with client certificates: %v", err)
	}
}

// TestXDSRefusesUnauthenticatedTCP: SDS hands out the fleet's private key, so TCP without client
// certificates is a configuration error, loopback included.
func TestXDSRefusesUnauthenticatedTCP(t *testing.T) {
	cases := []struct{ name, doc, want string }{
		{"loopback", "xds: {address: '127.0.0.1:18000'}", `xds.address: "127.0.0.1:18000" would hand the fleet's private key (SDS) to whoever connects over TCP, loopback included`},
		{"network", "xds: {address: '0.0.0.0:18000'}", `xds.address: "0.0.0.0:18000" would hand the fleet's private key`},
		{"any", "xds: {address: ':18000'}", "set xds.tls {certChain, privateKey, clientCA}"},
		{"tls incomplete", "xds: {address: '0.0.0.0:18000', tls: {certChain: a.pem, privateKey: b.pem}}", "xds.tls.clientCA: required with xds.tls"},
		{"tls without address", "xds: {tls: {certChain: a.pem, privateKey: b.pem, clientCA: c.pem}}", "xds.tls: set without xds.address"},
		{"socket is a directory", "xds: {socket: /run/fwdproxy/}", `xds.socket: "/run/fwdproxy/" is a directory`},
		{"socket too long", "xds: {socket: /run/" + strings.Repeat("d", 100) + "/xds.sock}", "bytes long; Unix socket paths are limited"},
		{"bad group", "xds: {group: 'envoy:envoy'}", `xds.group: "envoy:envoy" is not a group name or number`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(peersBase+tc.doc+"\n"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not contain %q", err, tc.want)
			}
		})
	}
}

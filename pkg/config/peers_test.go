package config

import (
	"strings"
	"testing"
	"time"
)

const peersBase = `
mesh: {trustDomain: cluster.local}
gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
`

func TestPeersDefaults(t *testing.T) {
	c, err := Parse("c.yaml", []byte(peersBase+"peers: {bind: 0.0.0.0:7946, keyring: gossip.keys, seeds: [10.0.0.2:7946]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Peers.Timing != "lan" || c.Peers.TombstoneTTL != 24*time.Hour || c.Admin.Address != "" || c.Admin.Socket != DefaultAdminSocket {
		t.Fatalf("defaults: %+v %+v", c.Peers, c.Admin)
	}
	for _, ok := range []string{
		"admin: {address: '0.0.0.0:9180', tokenFile: /etc/fwdproxy/admin.token}",
		"admin: {address: '10.0.0.5:9180', tls: {certChain: a.pem, privateKey: b.pem, clientCA: c.pem}}",
		"admin: {address: 'localhost:9180', tokenFile: admin.token}",
		"admin: {socket: /run/fwdproxy/admin.sock, group: fwdproxy-admin}",
		"peers: {bind: 0.0.0.0:7946, allowUnencrypted: true, aws: {}}",
		"peers: {bind: 0.0.0.0:7946, keyring: k, aws: {region: eu-west-3, autoScalingGroup: fleet, endpoint: 'http://127.0.0.1:4566'}}",
	} {
		if _, err := Parse("c.yaml", []byte(peersBase+ok+"\n")); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

func TestPeersErrors(t *testing.T) {
	cases := []struct{ name, doc, want string }{
		{"admin elsewhere without auth", "admin: {address: '0.0.0.0:9180'}", `admin.address: "0.0.0.0:9180" would let whoever connects over TCP change the whole fleet`},
		{"admin any without auth", "admin: {address: ':9180'}", "admin.address"},
		// Loopback is no exception: every local user reaches it.
		{"admin loopback without auth", "admin: {address: '127.0.0.1:9180'}", `admin.address: "127.0.0.1:9180" would let whoever connects over TCP change the whole fleet, loopback included`},
		{"admin tls incomplete", "admin: {address: '10.0.0.5:9180', tls: {certChain: a.pem}}", "admin.tls.clientCA: required"},
		{"admin token without address", "admin: {tokenFile: admin.token}", "admin.address: required with admin.tokenFile"},
		{"admin bad group", "admin: {group: 'ops team'}", `admin.group: "ops team" is not a group name`},
		{"admin socket is the xds socket", "admin: {socket: /run/fwdproxy/xds.sock}", "admin.socket: /run/fwdproxy/xds.sock is also xds.socket"},
		{"no keyring", "peers: {bind: 0.0.0.0:7946}", "peers.keyring: required when gossip is on"},
		{"keyring and unencrypted", "peers: {bind: 0.0.0.0:7946, keyring: k, allowUnencrypted: true}", "peers.allowUnencrypted: contradicts"},
		{"bad bind", "peers: {bind: 7946, keyring: k}", `peers.bind: "7946" is not host:port`},
		{"bind port 0", "peers: {bind: '0.0.0.0:0', keyring: k}", "peers.bind: port 0"},
		{"seeds without bind", "peers: {seeds: [10.0.0.2:7946]}", "peers.bind: required when peers.seeds"},
		{"bad seed", "peers: {bind: 0.0.0.0:7946, keyring: k, seeds: [10.0.0.2]}", "peers.seeds[0]:"},
		{"bad advertise", "peers: {bind: 0.0.0.0:7946, keyring: k, advertise: host.example:7946}", "peers.advertise:"},
		{"bad timing", "peers: {bind: 0.0.0.0:7946, keyring: k, timing: fast}", `peers.timing: "fast" is not a timing profile`},
		{"short tombstones", "peers: {bind: 0.0.0.0:7946, keyring: k, tombstoneTTL: 1s}", "peers.tombstoneTTL: 1s is too short"},
		{"bad aws endpoint", "peers: {bind: 0.0.0.0:7946, keyring: k, aws: {endpoint: 'localhost:4566'}}", "peers.aws.endpoint:"},
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

package config

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

const reverseBase = `
gateways: [{name: gw, address: 10.0.0.1}]
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
reverse:
  loadBalancer: fwdproxy.nlb.example.internal
  services:
    - host: Billing.VM.example.internal.
      aliases: [billing.legacy.internal]
      ports: [{number: 8080, protocol: HTTP, targetPort: 80, healthCheckPath: /healthz}, {number: 5432, protocol: tcp}]
      backends: [10.0.1.5, "10.0.1.6:8081", vm3.example.internal]
      allowedPrincipals: [cluster.local/ns/shop/sa/frontend, spiffe://cluster.local/ns/shop/sa/cart]
`

func TestReverseDefaults(t *testing.T) {
	c, err := Parse("c.yaml", []byte(reverseBase))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Reverse
	if !r.Enabled() || r.Port != 15443 || r.LoadBalancerPort != 15443 || r.Address != "0.0.0.0" || r.Namespace != "istio-system" ||
		!slices.Equal(r.ExportTo, []string{"*"}) || r.HealthCheck.Interval != 5*time.Second || r.HealthCheck.UnhealthyThreshold != 2 ||
		r.ConnectTimeout != 2*time.Second || r.Outlier.ConsecutiveErrors != 5 {
		t.Errorf("defaults: %+v", r)
	}
	s := r.Services[0]
	if s.Host != "billing.vm.example.internal" || s.Ports[0].Protocol != "http" || s.Ports[0].TargetPort != 80 || s.Ports[1].TargetPort != 5432 {
		t.Errorf("service normalized to %+v", s)
	}
	if got := s.Principals(); !slices.Equal(got, []string{"spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/shop/sa/cart"}) {
		t.Errorf("principals %v", got)
	}
	if h, p := SplitBackend(s.Backends[1], 80); h != "10.0.1.6" || p != 8081 {
		t.Errorf("SplitBackend = %s %d", h, p)
	}
	if h, p := SplitBackend(s.Backends[2], 80); h != "vm3.example.internal" || p != 80 {
		t.Errorf("SplitBackend = %s %d", h, p)
	}
	// The inbound port is reserved: a catalog service on it would not bind.
	found := false
	for _, rp := range c.ReservedPorts() {
		found = found || (rp.Port == 15443 && rp.Field == "reverse.port")
	}
	if !found {
		t.Errorf("reverse.port not reserved: %+v", c.ReservedPorts())
	}
}

func TestReverseErrors(t *testing.T) {
	cases := []struct{ name, from, to, want string }{
		{"bad host", "Billing.VM.example.internal.", "billing", `reverse.services[0].host: "billing" is not a fully qualified DNS name`},
		{"bad alias", "[billing.legacy.internal]", "[not_valid.x]", `reverse.services[0].aliases[0]: "not_valid.x"`},
		{"bad protocol", "protocol: tcp}", "protocol: grpc}", `reverse.services[0].ports[1].protocol: "grpc" is not supported in the reverse direction; use http or tcp`},
		{"path on tcp", "protocol: tcp}", "protocol: tcp, healthCheckPath: /x}", `reverse.services[0].ports[1].healthCheckPath`},
		{"bad port", "number: 5432", "number: 70000", `reverse.services[0].ports[1].number: 70000 is not a valid port`},
		{"duplicate port", "number: 5432", "number: 8080", `reverse.services[0].ports[1].number: port 8080 of billing.vm.example.internal is already served by reverse.services[0].ports[0]`},
		{"no backends", "backends: [10.0.1.5, \"10.0.1.6:8081\", vm3.example.internal]", "backends: []", "reverse.services[0].backends: at least one backend is required"},
		{"bad backend", "vm3.example.internal]", "\"vm3:99999\"]", `reverse.services[0].backends[2]: "vm3:99999" has an invalid port`},
		{"bad principal", "cluster.local/ns/shop/sa/frontend", "spiffe://", `reverse.services[0].allowedPrincipals[0]: "spiffe://" is not a principal`},
		{"bad lb", "fwdproxy.nlb.example.internal", "not a name", `reverse.loadBalancer: "not a name" is neither`},
		{"port taken", "  loadBalancer:", "  port: 9102\n  loadBalancer:", "reverse.port: 9102 is taken by metrics.address"},
		{"unknown field", "  loadBalancer:", "  lb: x\n  loadBalancer:", `unknown field "lb"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			doc := strings.Replace(reverseBase, tc.from, tc.to, 1)
			if doc == reverseBase {
				t.Fatalf("case does not change the document")
			}
			_, err := Parse("c.yaml", []byte(doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want %q", err, tc.want)
			}
		})
	}
	// No allowed principal is valid: the service refuses every caller, deliberately.
	doc := strings.Replace(reverseBase, "allowedPrincipals: [cluster.local/ns/shop/sa/frontend, spiffe://cluster.local/ns/shop/sa/cart]", "allowedPrincipals: []", 1)
	if _, err := Parse("c.yaml", []byte(doc)); err != nil {
		t.Errorf("empty allowedPrincipals refused: %v", err)
	}
}

func TestExampleReverseSection(t *testing.T) {
	data, err := os.ReadFile("../../examples/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	i := strings.Index(doc, "# reverse:")
	if i < 0 {
		t.Fatal("examples/config.yaml has no reverse section")
	}
	var b strings.Builder
	b.WriteString(doc[:i])
	for _, line := range strings.Split(doc[i:], "\n") {
		b.WriteString(strings.TrimPrefix(line, "# ") + "\n")
	}
	c, err := Parse("../../examples/config.yaml", []byte(b.String()))
	if err != nil {
		t.Fatalf("the example's reverse section, uncommented: %v", err)
	}
	if !c.Reverse.Enabled() || c.Reverse.Services[0].Ports[1].Protocol != "tcp" {
		t.Errorf("reverse: %+v", c.Reverse)
	}
}

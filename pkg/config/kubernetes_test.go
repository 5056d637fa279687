package config

import (
	"strings"
	"testing"
)

const kubeBase = `
mesh: {trustDomain: cluster.local}
identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: c.pem, privateKey: k.pem, roots: r.pem}
discovery:
  kubernetes:
    - name: primary
`

func TestKubernetesDefaults(t *testing.T) {
	c, err := Parse("c.yaml", []byte(kubeBase))
	if err != nil {
		t.Fatalf("a config whose gateway is discovered should need no gateways: %v", err)
	}
	k := c.Discovery.Kubernetes[0]
	if k.ClusterDomain != "cluster.local" || k.TrustDomain != "cluster.local" || !k.Gateway.Enabled() ||
		k.Gateway.Name != "primary" || k.Gateway.LabelSelector != "istio=eastwestgateway" || k.Gateway.Port != 15443 {
		t.Errorf("defaults: %+v", k)
	}
	if got := c.CatalogOptions().Gateways; len(got) != 1 || got[0] != "primary" {
		t.Errorf("catalog gateways %v", got)
	}
	off := strings.Replace(kubeBase, "- name: primary", "- {name: primary, gateway: {discover: false}}", 1)
	if _, err := Parse("c.yaml", []byte(off)); err == nil || !strings.Contains(err.Error(), "gateways: at least one east-west gateway is required") {
		t.Errorf("without discovery or configured gateways: %v", err)
	}
}

func TestKubernetesErrors(t *testing.T) {
	cases := []struct{ name, entry, want string }{
		{"no name", "- {kubeconfig: k}", "discovery.kubernetes[0].name: required"},
		{"bad name", "- {name: Primary_1}", `discovery.kubernetes[0].name: "Primary_1" is not a valid cluster name`},
		{"twice", "- {name: a}\n    - {name: a, gateway: {name: b}}", `discovery.kubernetes[1].name: cluster "a" is listed twice`},
		{"bad selector", "- {name: a, labelSelector: 'a=b=c'}", "discovery.kubernetes[0].labelSelector:"},
		{"bad annotation", "- {name: a, exposeAnnotation: 'not valid/x/y'}", "discovery.kubernetes[0].exposeAnnotation:"},
		{"bad namespace", "- {name: a, namespaces: [Bad]}", `discovery.kubernetes[0].namespaces[0]: "Bad" is not a valid namespace name`},
		{"bad trust domain", "- {name: a, trustDomain: 'Bad TD'}", "discovery.kubernetes[0].trustDomain:"},
		{"empty gateway selector", "- {name: a, gateway: {labelSelector: ' '}}", "discovery.kubernetes[0].gateway.labelSelector:"},
		{"gateway name clash", "- {name: a}\n    - {name: b, gateway: {name: a}}", `discovery.kubernetes[1].gateway.name: gateway "a" is already configured`},
		{"bad gateway port", "- {name: a, gateway: {port: 70000}}", "discovery.kubernetes[0].gateway.port: 70000"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			doc := strings.Replace(kubeBase, "- name: primary", tc.entry, 1)
			_, err := Parse("c.yaml", []byte(doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not contain %q", err, tc.want)
			}
		})
	}
}

package daemon

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// cluster is one Istio primary: reviews backed by a pod running as sa, and its east-west gateway
// with load-balancer address gw.
func reviewsCluster(sa, gw string) []runtime.Object {
	ready := true
	return []runtime.Object{
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: "bookinfo"},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 9080}}}},
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "reviews-1", Namespace: "bookinfo"}, Spec: corev1.PodSpec{ServiceAccountName: sa}},
		&discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: "reviews-x", Namespace: "bookinfo",
			Labels: map[string]string{discoveryv1.LabelServiceName: "reviews"}}, AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "reviews-1", Namespace: "bookinfo"}}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "istio-eastwestgateway", Namespace: "istio-system", Labels: map[string]string{"istio": "eastwestgateway"}},
			Spec:   corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Ports: []corev1.ServicePort{{Name: "tls", Port: 15443}}},
			Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: gw}}}}},
	}
}

// Two clusters of a multi-primary mesh with the same Service: one upstream cluster whose
// endpoints are both gateways, the local one at priority 0 and the remote one at 1, accepting
// the workloads of both clusters.
func TestMultiClusterThroughDaemon(t *testing.T) {
	dir := t.TempDir()
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	writeFleetIdentity(t, ca, dir, time.Hour)
	doc := fmt.Sprintf(`identity:
  spiffeID: spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy
  files: {certChain: cert-chain.pem, privateKey: key.pem, roots: root-cert.pem}
discovery:
  kubernetes:
    - {name: east, namespaces: [bookinfo], gateway: {namespace: istio-system}}
    - {name: west, namespaces: [bookinfo], gateway: {namespace: istio-system, priority: 1}}
listen: {address: 127.0.0.1}
dataplane: none
xds: {socket: xds.sock}
admin: {socket: admin.sock}
metrics: {address: %q}
`, freeAddr(t))
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	d := New(cfg, slog.New(slog.DiscardHandler))
	d.sources[0].(*kubeSource).Client = fake.NewClientset(reviewsCluster("reviews-east", "127.0.0.11")...)
	d.sources[1].(*kubeSource).Client = fake.NewClientset(reviewsCluster("reviews-west", "127.0.0.12")...)
	defer runDaemon(t, d)()
	const host = "reviews.bookinfo.svc.cluster.local"
	eventually(t, "both clusters' gateways and services", func() bool {
		cat, opts, _, _ := d.Inputs()
		s := cat.Lookup(host)
		return len(opts.Gateways) == 2 && s != nil && len(s.Identities) == 2
	})
	cat, opts, _, conflicts := d.Inputs()
	if len(conflicts) != 0 {
		t.Errorf("conflicts: %v", conflicts)
	}
	if s := cat.Lookup(host); !slices.Equal(s.Gateways, []string{"east", "west"}) ||
		!slices.Equal(s.Identities, []string{"spiffe://cluster.local/ns/bookinfo/sa/reviews-east", "spiffe://cluster.local/ns/bookinfo/sa/reviews-west"}) {
		t.Fatalf("merged service: %+v", s)
	}
	res, err := controlplane.Translate(cat, opts)
	if err != nil {
		t.Fatal(err)
	}
	name := controlplane.ClusterName(9080, "", host)
	var found bool
	for _, cla := range res.Endpoints {
		if cla.ClusterName != name {
			continue
		}
		found = true
		le := cla.Endpoints
		if len(le) != 2 || le[0].Priority != 0 || le[1].Priority != 1 ||
			le[0].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress() != "127.0.0.11" ||
			le[1].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress() != "127.0.0.12" {
			t.Errorf("endpoints: %v", le)
		}
	}
	if !found {
		t.Fatalf("no endpoints for %s", name)
	}
	// The upstream TLS accepts either cluster's workload.
	for _, c := range res.Clusters {
		if c.Name != name {
			continue
		}
		var tc tlsv3.UpstreamTlsContext
		if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(&tc); err != nil {
			t.Fatal(err)
		}
		var sans []string
		for _, m := range tc.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
			sans = append(sans, m.GetMatcher().GetExact())
		}
		if !slices.Equal(sans, []string{"spiffe://cluster.local/ns/bookinfo/sa/reviews-east", "spiffe://cluster.local/ns/bookinfo/sa/reviews-west"}) {
			t.Errorf("SAN matchers: %v", sans)
		}
	}
}

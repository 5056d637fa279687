package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	k8stesting "k8s.io/client-go/testing"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// loadManifests decodes a multi-document YAML file of Kubernetes objects.
func loadManifests(t *testing.T, path string) []runtime.Object {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var objs []runtime.Object
	for i, doc := range strings.Split(string(data), "\n---\n") {
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("%s document %d: %v", path, i, err)
		}
		objs = append(objs, obj)
	}
	return objs
}

// harness runs a Kubernetes source and collects what it reports.
type harness struct {
	t        *testing.T
	src      *Kubernetes
	reg      *prometheus.Registry
	cats     chan *catalog.Catalog
	gateways chan DiscoveredGateway
	done     chan error
	logs     *meshtest.SyncBuffer
	cancel   context.CancelFunc
	stopped  bool
	last     *catalog.Catalog
}

func newHarness(t *testing.T, client *fake.Clientset, configure func(*Kubernetes)) *harness {
	t.Helper()
	return startHarness(t, client, configure)
}

func startHarness(t *testing.T, client KubeClient, configure func(*Kubernetes)) *harness {
	t.Helper()
	h := &harness{t: t, reg: prometheus.NewRegistry(), cats: make(chan *catalog.Catalog, 64),
		gateways: make(chan DiscoveredGateway, 64), done: make(chan error, 1), logs: &meshtest.SyncBuffer{}}
	h.src = &Kubernetes{
		Cluster:       "primary",
		Client:        client,
		ClusterDomain: "cluster.local",
		TrustDomain:   "cluster.local",
		Gateway: KubernetesGateway{Enabled: true, Name: "primary", Namespace: "istio-system",
			LabelSelector: "istio=eastwestgateway", Port: 15443, Network: "network1"},
		OnGateway: func(g DiscoveredGateway) { h.gateways <- g },
		Options:   catalog.Options{Gateways: []string{"primary"}},
		Debounce:  20 * time.Millisecond,
		Log:       slog.New(slog.NewTextHandler(h.logs, nil)),
		Metrics:   NewSourceMetrics(h.reg),
	}
	if configure != nil {
		configure(h.src)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.src.Run(ctx, func(c *catalog.Catalog) { h.cats <- c }) }()
	t.Cleanup(h.stop)
	return h
}

// stop ends the source and checks that Run returns cleanly.
func (h *harness) stop() {
	if h.stopped {
		return
	}
	h.stopped = true
	h.cancel()
	select {
	case err := <-h.done:
		if err != nil {
			h.t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		h.t.Error("Run did not return after cancel")
	}
}

// next waits for the next catalog.
func (h *harness) next() *catalog.Catalog {
	h.t.Helper()
	select {
	case c := <-h.cats:
		h.last = c
		return c
	case err := <-h.done:
		h.t.Fatalf("source stopped: %v", err)
	case <-time.After(10 * time.Second):
		h.t.Fatal("no catalog reported within 10s")
	}
	return nil
}

// until waits for a catalog satisfying ok.
func (h *harness) until(what string, ok func(*catalog.Catalog) bool) *catalog.Catalog {
	h.t.Helper()
	return h.untilWithin(10*time.Second, what, ok)
}

func (h *harness) untilWithin(limit time.Duration, what string, ok func(*catalog.Catalog) bool) *catalog.Catalog {
	h.t.Helper()
	deadline := time.After(limit)
	for {
		select {
		case c := <-h.cats:
			h.last = c
			if ok(c) {
				return c
			}
		case <-deadline:
			h.t.Fatalf("no catalog with %s within %v", what, limit)
		}
	}
}

// current is the latest catalog reported so far.
func (h *harness) current() *catalog.Catalog {
	for {
		select {
		case c := <-h.cats:
			h.last = c
		default:
			return h.last
		}
	}
}

func (h *harness) nextGateway() DiscoveredGateway {
	h.t.Helper()
	select {
	case g := <-h.gateways:
		return g
	case <-time.After(10 * time.Second):
		h.t.Fatal("no gateway reported within 10s")
	}
	return DiscoveredGateway{}
}

func bookinfo(t *testing.T) *fake.Clientset {
	return fake.NewClientset(loadManifests(t, "testdata/kubernetes/bookinfo.yaml")...)
}

func hosts(c *catalog.Catalog) []string {
	var out []string
	for _, s := range c.Services {
		out = append(out, s.Host)
	}
	return out
}

func TestKubernetesBookinfo(t *testing.T) {
	h := newHarness(t, bookinfo(t), func(k *Kubernetes) { k.Namespaces = []string{"bookinfo"} })
	got := h.next()
	gw := []string{"primary"}
	http := func(n uint32, name string) catalog.Port {
		return catalog.Port{Number: n, Protocol: catalog.HTTP, Name: name}
	}
	want := &catalog.Catalog{Checked: true, Services: []catalog.Service{
		{Host: "checkout.bookinfo.svc.cluster.local",
			Ports:      []catalog.Port{{Number: 7070, Protocol: catalog.GRPC, Name: "api"}, {Number: 8081, Protocol: catalog.HTTP2, Name: "metrics"}},
			Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/default"}, Gateways: gw},
		{Host: "details.bookinfo.svc.cluster.local", Ports: []catalog.Port{http(9080, "http")},
			Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details"}, Gateways: gw},
		{Host: "mongodb.bookinfo.svc.cluster.local", Ports: []catalog.Port{{Number: 27017, Protocol: catalog.TCP, Name: "mongo"}},
			Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-mongodb"}, Gateways: gw},
		{Host: "productpage.bookinfo.svc.cluster.local",
			Ports:      []catalog.Port{http(9080, "http"), {Number: 9443, Protocol: catalog.TCP, Name: "https-admin"}},
			Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"}, Gateways: gw},
		{Host: "ratings.bookinfo.svc.cluster.local", Ports: []catalog.Port{http(9080, "http")},
			Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"}, Gateways: gw},
		// three versions, one service account: one identity
		{Host: "reviews.bookinfo.svc.cluster.local", Ports: []catalog.Port{http(9080, "http")},
			Identities: []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"}, Gateways: gw},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("catalog:\n got %+v\nwant %+v", got.Services, want.Services)
	}
	if err := got.Validate(h.src.Options); err != nil {
		t.Fatalf("emitted catalog does not validate: %v", err)
	}
	g := h.nextGateway()
	wantGw := DiscoveredGateway{Name: "primary", Network: "network1", Port: 15443,
		Addresses: []string{"a1b2c3d4e5f6-0123456789.elb.eu-west-1.amazonaws.com"}}
	if !reflect.DeepEqual(g, wantGw) {
		t.Fatalf("gateway: got %+v, want %+v", g, wantGw)
	}
	src := h.src.Name()
	for reason, n := range map[string]float64{SkipNoIdentity: 2, SkipNoPorts: 1, SkipInvalid: 1} {
		if v := testutil.ToFloat64(h.src.Metrics.skipped.WithLabelValues(src, reason)); v != n {
			t.Errorf("skipped{reason=%s} = %v, want %v", reason, v, n)
		}
	}
	if v := testutil.ToFloat64(h.src.Metrics.lastSuccess.WithLabelValues(src)); v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last success timestamp %v is not recent", v)
	}
	logs := h.logs.String()
	for _, want := range []string{
		"service=ratings-v2.bookinfo.svc.cluster.local reason=no_workload_identity",
		"service=legacy-db.bookinfo.svc.cluster.local reason=no_workload_identity",
		"service=statsd.bookinfo.svc.cluster.local reason=no_tcp_ports",
		"service=mongodb-legacy.bookinfo.svc.cluster.local reason=invalid",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}

func TestKubernetesFollowsChanges(t *testing.T) {
	client := bookinfo(t)
	h := newHarness(t, client, func(k *Kubernetes) { k.Namespaces = []string{"bookinfo"} })
	h.next()
	h.nextGateway()
	ctx := context.Background()

	// reviews-v4 rolls out under its own service account: the service gains an identity.
	if _, err := client.CoreV1().Pods("bookinfo").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews-v4-5f7d9-qwert", Namespace: "bookinfo", Labels: map[string]string{"app": "reviews", "version": "v4"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "bookinfo-reviews-v4"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready := true
	if _, err := client.DiscoveryV1().EndpointSlices("bookinfo").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "reviews-v4sl1", Namespace: "bookinfo", Labels: map[string]string{discoveryv1.LabelServiceName: "reviews"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.3.40"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "bookinfo", Name: "reviews-v4-5f7d9-qwert"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.until("reviews-v4's identity", func(c *catalog.Catalog) bool {
		s := c.Lookup("reviews.bookinfo.svc.cluster.local")
		return s != nil && reflect.DeepEqual(s.Identities, []string{
			"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews", "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews-v4"})
	})

	// ratings-v2 gets its first pod: it stops being skipped.
	if _, err := client.CoreV1().Pods("bookinfo").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ratings-v2-abc", Namespace: "bookinfo"},
		Spec:       corev1.PodSpec{ServiceAccountName: "bookinfo-ratings-v2"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sl, err := client.DiscoveryV1().EndpointSlices("bookinfo").Get(ctx, "ratings-v2-x7k2p", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sl.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.50"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "ratings-v2-abc"}}}
	if _, err := client.DiscoveryV1().EndpointSlices("bookinfo").Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c := h.until("ratings-v2", func(c *catalog.Catalog) bool { return c.Lookup("ratings-v2.bookinfo.svc.cluster.local") != nil })
	if s := c.Lookup("ratings-v2.bookinfo.svc.cluster.local"); s.Ports[0].Protocol != catalog.HTTP || s.Identities[0] != "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings-v2" {
		t.Errorf("ratings-v2: %+v", s)
	}

	// details is deleted: it leaves the catalog.
	if err := client.CoreV1().Services("bookinfo").Delete(ctx, "details", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.until("details gone", func(c *catalog.Catalog) bool { return c.Lookup("details.bookinfo.svc.cluster.local") == nil })

	// The gateway's load balancer gets IP addresses.
	gwSvc, err := client.CoreV1().Services("istio-system").Get(ctx, "istio-eastwestgateway", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	gwSvc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "10.20.0.11"}, {IP: "10.20.0.10"}}
	if _, err := client.CoreV1().Services("istio-system").UpdateStatus(ctx, gwSvc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if g := h.nextGateway(); !reflect.DeepEqual(g.Addresses, []string{"10.20.0.10", "10.20.0.11"}) {
		t.Errorf("gateway addresses after the LB change: %v", g.Addresses)
	}
}

func TestKubernetesSelection(t *testing.T) {
	objs := loadManifests(t, "testdata/kubernetes/bookinfo.yaml")
	for _, o := range objs {
		if s, ok := o.(*corev1.Service); ok {
			switch s.Name {
			case "details":
				s.Annotations = map[string]string{"fwdproxy.io/expose": "true"}
				s.Labels["fwdproxy.io/expose"] = "true"
			case "ratings":
				s.Annotations = map[string]string{"fwdproxy.io/expose": "false"}
				s.Labels["fwdproxy.io/expose"] = "true"
			case "api":
				s.Labels["fwdproxy.io/expose"] = "true"
				s.Annotations = map[string]string{"fwdproxy.io/expose": "true"}
			}
		}
	}
	cases := []struct {
		name      string
		configure func(*Kubernetes)
		want      []string
	}{
		{"label selector, all namespaces", func(k *Kubernetes) { k.LabelSelector = "fwdproxy.io/expose=true" },
			[]string{"api.payments.svc.cluster.local", "details.bookinfo.svc.cluster.local", "ratings.bookinfo.svc.cluster.local"}},
		{"annotation opt-in", func(k *Kubernetes) { k.ExposeAnnotation = "fwdproxy.io/expose" },
			[]string{"api.payments.svc.cluster.local", "details.bookinfo.svc.cluster.local"}},
		{"annotation in one namespace", func(k *Kubernetes) {
			k.ExposeAnnotation = "fwdproxy.io/expose"
			k.Namespaces = []string{"payments"}
		}, []string{"api.payments.svc.cluster.local"}},
		{"cluster domain and trust domain", func(k *Kubernetes) {
			k.Namespaces = []string{"payments"}
			k.ClusterDomain = "east.example"
			k.TrustDomain = "east.example"
			k.Gateway.Enabled = false
		}, []string{"api.payments.svc.east.example"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, fake.NewClientset(objs...), tc.configure)
			c := h.next()
			if got := hosts(c); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("hosts: got %v, want %v", got, tc.want)
			}
			if !h.src.Gateway.Enabled {
				s := c.Services[0]
				if len(s.Gateways) != 0 || s.Identities[0] != "spiffe://east.example/ns/payments/sa/payments-api" || s.Ports[0].Protocol != catalog.HTTP2 {
					t.Errorf("service: %+v", s)
				}
			}
		})
	}
}

func TestKubernetesSyncErrors(t *testing.T) {
	client := bookinfo(t)
	var mu sync.Mutex
	failing := true
	client.PrependReactor("list", "endpointslices", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		if failing {
			return true, nil, errors.New("connection refused")
		}
		return false, nil, nil
	})
	h := newHarness(t, client, func(k *Kubernetes) { k.Namespaces = []string{"bookinfo"} })
	counter := h.src.Metrics.syncErrors.WithLabelValues(h.src.Name())
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(counter) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if testutil.ToFloat64(counter) == 0 {
		t.Fatal("list errors were not counted in fwdproxy_discovery_sync_errors_total")
	}
	select {
	case c := <-h.cats:
		t.Fatalf("a catalog was reported before the caches synced: %v", hosts(c))
	default:
	}
	mu.Lock()
	failing = false
	mu.Unlock()
	if c := h.next(); len(c.Services) != 6 {
		t.Fatalf("after recovery: %v", hosts(c))
	}
	if !strings.Contains(h.logs.String(), "connection refused") {
		t.Error("the list error was not logged")
	}
	if n := testutil.CollectAndCount(h.reg, "fwdproxy_discovery_last_success_timestamp_seconds"); n != 1 {
		t.Errorf("last success series: %d", n)
	}
}

func TestIstioProtocol(t *testing.T) {
	ap := func(s string) *string { return &s }
	cases := []struct {
		port corev1.ServicePort
		want catalog.Protocol
		ok   bool
	}{
		{corev1.ServicePort{Name: "http"}, catalog.HTTP, true},
		{corev1.ServicePort{Name: "http-web"}, catalog.HTTP, true},
		{corev1.ServicePort{Name: "HTTP-Web"}, catalog.HTTP, true},
		{corev1.ServicePort{Name: "http2-api"}, catalog.HTTP2, true},
		{corev1.ServicePort{Name: "grpc"}, catalog.GRPC, true},
		{corev1.ServicePort{Name: "grpc-orders"}, catalog.GRPC, true},
		{corev1.ServicePort{Name: "grpc-web-ui"}, catalog.HTTP, true},
		{corev1.ServicePort{Name: "tcp-db"}, catalog.TCP, true},
		{corev1.ServicePort{Name: "https"}, catalog.TCP, true},
		{corev1.ServicePort{Name: "tls-passthrough"}, catalog.TCP, true},
		{corev1.ServicePort{Name: "mongo"}, catalog.TCP, true},
		{corev1.ServicePort{Name: "mysql-primary"}, catalog.TCP, true},
		{corev1.ServicePort{Name: "redis"}, catalog.TCP, true},
		{corev1.ServicePort{Name: "web"}, catalog.TCP, true},                           // Istio would sniff; we forward TCP
		{corev1.ServicePort{Name: ""}, catalog.TCP, true},                              // unnamed
		{corev1.ServicePort{Name: "httpx"}, catalog.TCP, true},                         // not a prefix match
		{corev1.ServicePort{Name: "tcp", AppProtocol: ap("http")}, catalog.HTTP, true}, // appProtocol wins
		{corev1.ServicePort{Name: "http", AppProtocol: ap("tcp")}, catalog.TCP, true},
		{corev1.ServicePort{Name: "x", AppProtocol: ap("GRPC")}, catalog.GRPC, true},
		{corev1.ServicePort{Name: "x", AppProtocol: ap("kubernetes.io/h2c")}, catalog.HTTP2, true},
		{corev1.ServicePort{Name: "x", AppProtocol: ap("kubernetes.io/ws")}, catalog.HTTP, true},
		{corev1.ServicePort{Name: "x", AppProtocol: ap("kubernetes.io/wss")}, catalog.TCP, true},
		{corev1.ServicePort{Name: "dns", Protocol: corev1.ProtocolUDP}, "", false},
		{corev1.ServicePort{Name: "sctp", Protocol: corev1.ProtocolSCTP}, "", false},
		{corev1.ServicePort{Name: "udp-statsd"}, "", false},
		{corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP}, catalog.HTTP, true},
	}
	for _, tc := range cases {
		got, ok := IstioProtocol(tc.port)
		if got != tc.want || ok != tc.ok {
			ap := "<nil>"
			if tc.port.AppProtocol != nil {
				ap = *tc.port.AppProtocol
			}
			t.Errorf("IstioProtocol(name=%q appProtocol=%s protocol=%q) = %q, %v; want %q, %v", tc.port.Name, ap, tc.port.Protocol, got, ok, tc.want, tc.ok)
		}
	}
}

// The appliance's RBAC manifest grants exactly KubernetesReads (what the source reads), binds it
// to its ServiceAccount, and nothing else: read-only, no Secrets.
func TestRBACManifest(t *testing.T) {
	objs := loadManifests(t, "../../deploy/kubernetes/rbac.yaml")
	var role *rbacv1.ClusterRole
	var binding *rbacv1.ClusterRoleBinding
	var sa *corev1.ServiceAccount
	for _, o := range objs {
		switch v := o.(type) {
		case *rbacv1.ClusterRole:
			role = v
		case *rbacv1.ClusterRoleBinding:
			binding = v
		case *corev1.ServiceAccount:
			sa = v
		}
	}
	if role == nil || binding == nil || sa == nil {
		t.Fatalf("manifest lacks a ClusterRole, ClusterRoleBinding or ServiceAccount")
	}
	var granted, want []string
	for _, r := range role.Rules {
		if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %v: resourceNames and nonResourceURLs are not what the source reads", r)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, verb := range r.Verbs {
					granted = append(granted, verb+" "+g+"/"+res)
				}
			}
		}
	}
	for _, r := range KubernetesReads {
		for _, verb := range r.Verbs {
			want = append(want, verb+" "+r.Group+"/"+r.Resource)
		}
	}
	slices.Sort(granted)
	slices.Sort(want)
	if !slices.Equal(granted, want) {
		t.Errorf("rbac.yaml grants %v; the source reads %v (KubernetesReads): make them equal", granted, want)
	}
	if binding.RoleRef.Name != role.Name || len(binding.Subjects) != 1 || binding.Subjects[0].Name != sa.Name || binding.Subjects[0].Namespace != sa.Namespace {
		t.Errorf("binding %+v does not bind %s to %s/%s", binding, role.Name, sa.Namespace, sa.Name)
	}
}

// BenchmarkKubernetesBuild turns a cluster of 10,000 Services (one pod each) into a catalog.
func BenchmarkKubernetesBuild(b *testing.B) {
	const n = 10000
	var svcs []*corev1.Service
	var slices []*discoveryv1.EndpointSlice
	sas := map[string]string{}
	for i := range n {
		name := fmt.Sprintf("svc-%05d", i)
		ns := fmt.Sprintf("ns-%03d", i%100)
		svcs = append(svcs, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 8080}, {Name: "grpc-api", Port: 9090}}}})
		pod := name + "-pod"
		sas[ns+"/"+pod] = name
		slices = append(slices, &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name + "-abc", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			Endpoints:  []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.1"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: pod}}},
		})
	}
	podSA := func(ns, name string) (string, bool) { sa, ok := sas[ns+"/"+name]; return sa, ok }
	k := &Kubernetes{Cluster: "bench", ClusterDomain: "cluster.local", TrustDomain: "cluster.local"}
	b.ReportAllocs()
	for b.Loop() {
		out := k.build(svcs, slices, podSA, nil, nil)
		if len(out.catalog.Services) != n {
			b.Fatalf("%d services", len(out.catalog.Services))
		}
	}
}

package discovery

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/fwdproxy/fwdproxy/internal/kubetest"
	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// These tests run discovery against a real kube-apiserver (RBAC authorization, etcd, the
// EndpointSlice controller), authenticated as the ServiceAccount deploy/kubernetes/rbac.yaml binds.

// realCluster is a control plane with deploy/kubernetes/rbac.yaml applied and one Node.
type realCluster struct {
	*kubetest.Cluster
	t   *testing.T
	ctx context.Context
	cs  kubernetes.Interface
	// requests records what the source asked the API server (verb resource), for the RBAC test.
	mu       sync.Mutex
	requests map[string]bool
}

func startRealCluster(t *testing.T) *realCluster {
	t.Helper()
	c := kubetest.Start(t)
	rc := &realCluster{Cluster: c, t: t, ctx: context.Background(), cs: c.Clientset, requests: map[string]bool{}}
	for _, o := range loadManifests(t, "../../deploy/kubernetes/rbac.yaml") {
		var err error
		switch v := o.(type) {
		case *corev1.Namespace:
			_, err = rc.cs.CoreV1().Namespaces().Create(rc.ctx, v, metav1.CreateOptions{})
		case *corev1.ServiceAccount:
			_, err = rc.cs.CoreV1().ServiceAccounts(v.Namespace).Create(rc.ctx, v, metav1.CreateOptions{})
		case *rbacv1.ClusterRole:
			_, err = rc.cs.RbacV1().ClusterRoles().Create(rc.ctx, v, metav1.CreateOptions{})
		case *rbacv1.ClusterRoleBinding:
			_, err = rc.cs.RbacV1().ClusterRoleBindings().Create(rc.ctx, v, metav1.CreateOptions{})
		default:
			t.Fatalf("rbac.yaml: unexpected %T", o)
		}
		if err != nil {
			t.Fatalf("apply rbac.yaml: %v", err)
		}
	}
	// No kubelet: the Node only exists so the EndpointSlice controller places pods on it.
	rc.must(rc.cs.CoreV1().Nodes().Create(rc.ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, metav1.CreateOptions{}))
	rc.namespace("istio-system")
	return rc
}

func (rc *realCluster) must(_ any, err error) {
	rc.t.Helper()
	if err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *realCluster) namespace(name string) {
	rc.t.Helper()
	rc.must(rc.cs.CoreV1().Namespaces().Create(rc.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}))
}

// service creates a Service selecting app=name with the given ports ("name/port" each).
func (rc *realCluster) service(ns, name string, ports ...string) {
	rc.t.Helper()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}}}
	for _, p := range ports {
		var pn string
		var num int32
		if _, err := fmt.Sscanf(strings.Replace(p, "/", " ", 1), "%s %d", &pn, &num); err != nil {
			rc.t.Fatalf("port %q: %v", p, err)
		}
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: pn, Port: num, TargetPort: intstr.FromInt32(num)})
	}
	rc.must(rc.cs.CoreV1().Services(ns).Create(rc.ctx, svc, metav1.CreateOptions{}))
}

// pod creates a pod of app, bound to node-a, running as service account sa, with an IP and the
// given readiness (as a kubelet would report it).
func (rc *realCluster) pod(ns, name, app, sa, ip string, ready bool) {
	rc.t.Helper()
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": app}},
		Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app:1"}}}}
	p, err := rc.cs.CoreV1().Pods(ns).Create(rc.ctx, p, metav1.CreateOptions{})
	if err != nil {
		rc.t.Fatal(err)
	}
	rc.setReady(p, ip, ready)
}

func (rc *realCluster) setReady(p *corev1.Pod, ip string, ready bool) {
	rc.t.Helper()
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}, {Type: corev1.ContainersReady, Status: status}}}
	rc.must(rc.cs.CoreV1().Pods(p.Namespace).UpdateStatus(rc.ctx, p, metav1.UpdateOptions{}))
}

// gateway creates the east-west gateway Service with a load-balancer address.
func (rc *realCluster) gateway(addr string) {
	rc.t.Helper()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "istio-eastwestgateway", Namespace: "istio-system",
		Labels: map[string]string{"istio": "eastwestgateway"}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"istio": "eastwestgateway"},
			Ports: []corev1.ServicePort{{Name: "tls", Port: 15443}}}}
	svc, err := rc.cs.CoreV1().Services("istio-system").Create(rc.ctx, svc, metav1.CreateOptions{})
	if err != nil {
		rc.t.Fatal(err)
	}
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: addr}}
	rc.must(rc.cs.CoreV1().Services("istio-system").UpdateStatus(rc.ctx, svc, metav1.UpdateOptions{}))
}

// source runs a Kubernetes source as fwdproxy's ServiceAccount.
func (rc *realCluster) source(configure func(*Kubernetes)) *harness {
	rc.t.Helper()
	cfg := rc.ServiceAccount("fwdproxy", "fwdproxy-discovery")
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return recorder{rt: rt, rc: rc} })
	client, err := NewKubeClient(cfg)
	if err != nil {
		rc.t.Fatal(err)
	}
	return startHarness(rc.t, client, func(k *Kubernetes) {
		k.Debounce = 50 * time.Millisecond
		if configure != nil {
			configure(k)
		}
	})
}

// recorder notes each request as "verb group/resource" in RBAC's terms.
type recorder struct {
	rt http.RoundTripper
	rc *realCluster
}

func (r recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	info := rbacRequest(req)
	r.rc.mu.Lock()
	r.rc.requests[info] = true
	r.rc.mu.Unlock()
	return r.rt.RoundTrip(req)
}

// rbacRequest names a read request as RBAC sees it: verb (list, watch, get) and group/resource.
func rbacRequest(req *http.Request) string {
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	group := ""
	switch {
	case len(parts) >= 2 && parts[0] == "api":
		parts = parts[2:]
	case len(parts) >= 3 && parts[0] == "apis":
		group, parts = parts[1], parts[3:]
	default:
		return req.Method + " " + req.URL.Path
	}
	if len(parts) >= 2 && parts[0] == "namespaces" && len(parts) != 2 {
		parts = parts[2:] // namespaced resource
	}
	verb := "get"
	if len(parts) == 1 {
		verb = "list"
		if req.URL.Query().Get("watch") == "true" || req.URL.Query().Get("watch") == "1" {
			verb = "watch"
		}
	}
	if req.Method != http.MethodGet {
		verb = strings.ToLower(req.Method)
	}
	return verb + " " + group + "/" + parts[0]
}

func identitiesOf(c *catalog.Catalog, host string) []string {
	if s := c.Lookup(host); s != nil {
		return s.Identities
	}
	return nil
}

func TestRealAPIServerDiscovery(t *testing.T) {
	rc := startRealCluster(t)
	rc.namespace("bookinfo")
	rc.gateway("192.0.2.10")
	rc.service("bookinfo", "reviews", "http/9080", "grpc-api/9090", "mongo/27017")
	rc.pod("bookinfo", "reviews-v1", "reviews", "bookinfo-reviews", "10.1.0.1", true)
	rc.pod("bookinfo", "reviews-v2", "reviews", "bookinfo-reviews-v2", "10.1.0.2", true)
	rc.service("bookinfo", "ratings", "http/9080")
	rc.pod("bookinfo", "ratings-v1", "ratings", "", "10.1.0.3", true)
	// No pod: no identity, left out.
	rc.service("bookinfo", "details", "http/9080")
	h := rc.source(func(k *Kubernetes) { k.Namespaces = []string{"bookinfo"} })

	if g := h.nextGateway(); !slices.Equal(g.Addresses, []string{"192.0.2.10"}) {
		t.Errorf("gateway: %+v", g)
	}
	c := h.until("reviews and ratings", func(c *catalog.Catalog) bool {
		return len(identitiesOf(c, "reviews.bookinfo.svc.cluster.local")) == 2 && c.Lookup("ratings.bookinfo.svc.cluster.local") != nil
	})
	reviews := c.Lookup("reviews.bookinfo.svc.cluster.local")
	want := []catalog.Port{{Number: 9080, Protocol: catalog.HTTP, Name: "http"}, {Number: 9090, Protocol: catalog.GRPC, Name: "grpc-api"},
		{Number: 27017, Protocol: catalog.TCP, Name: "mongo"}}
	if !slices.Equal(reviews.Ports, want) {
		t.Errorf("reviews ports: %+v, want %+v", reviews.Ports, want)
	}
	if got := reviews.Identities; !slices.Equal(got, []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews", "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews-v2"}) {
		t.Errorf("reviews identities: %v", got)
	}
	// A pod that names no service account runs as "default".
	if got := identitiesOf(c, "ratings.bookinfo.svc.cluster.local"); !slices.Equal(got, []string{"spiffe://cluster.local/ns/bookinfo/sa/default"}) {
		t.Errorf("ratings identities: %v", got)
	}
	if c.Lookup("details.bookinfo.svc.cluster.local") != nil {
		t.Error("details has no pod, so no identity, but is in the catalog")
	}
	if got := testutil.ToFloat64(h.src.Metrics.skipped.WithLabelValues(h.src.Name(), SkipNoIdentity)); got != 1 {
		t.Errorf("skipped no_workload_identity = %v, want 1 (details)", got)
	}

	// Changes are followed: a new pod's identity appears, a deleted Service disappears.
	rc.pod("bookinfo", "details-v1", "details", "bookinfo-details", "10.1.0.4", true)
	h.until("details", func(c *catalog.Catalog) bool {
		return slices.Equal(identitiesOf(c, "details.bookinfo.svc.cluster.local"), []string{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details"})
	})
	if err := rc.cs.CoreV1().Services("bookinfo").Delete(rc.ctx, "ratings", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.until("ratings gone", func(c *catalog.Catalog) bool { return c.Lookup("ratings.bookinfo.svc.cluster.local") == nil })

	if n := testutil.ToFloat64(h.src.Metrics.syncErrors.WithLabelValues(h.src.Name())); n != 0 {
		t.Errorf("sync errors as the ServiceAccount: %v\n%s", n, h.logs.String())
	}
	if up := testutil.ToFloat64(h.src.Metrics.connected.WithLabelValues(h.src.Name())); up != 1 {
		t.Errorf("fwdproxy_discovery_connected = %v, want 1", up)
	}
	if st, _ := h.src.Status(); !st.Connected || st.Since.IsZero() {
		t.Errorf("status: %+v", st)
	}
}

// The ClusterRole in rbac.yaml is exactly what the source reads, as the API server sees it.
func TestRealAPIServerRBACIsWhatTheCodeReads(t *testing.T) {
	rc := startRealCluster(t)
	rc.namespace("shop")
	rc.gateway("192.0.2.10")
	rc.service("shop", "cart", "http/8080")
	rc.pod("shop", "cart-1", "cart", "cart", "10.2.0.1", true)
	// Both shapes the daemon uses: all namespaces, and a list of them (gateway in its own).
	for _, namespaces := range [][]string{nil, {"shop"}} {
		h := rc.source(func(k *Kubernetes) { k.Namespaces = namespaces })
		h.until("cart", func(c *catalog.Catalog) bool { return c.Lookup("cart.shop.svc.cluster.local") != nil })
		if n := testutil.ToFloat64(h.src.Metrics.syncErrors.WithLabelValues(h.src.Name())); n != 0 {
			t.Errorf("namespaces %v: %v sync errors as the ServiceAccount:\n%s", namespaces, n, h.logs.String())
		}
		h.stop()
	}
	rc.mu.Lock()
	var used []string
	for r := range rc.requests {
		used = append(used, r)
	}
	rc.mu.Unlock()
	slices.Sort(used)
	// Every request is a declared read, and every declared resource is watched. A list shows up
	// only where the API server does not stream the initial state in the watch (client-go's
	// watch-list, on by default): it stays declared for older API servers.
	var declared []string
	for _, r := range KubernetesReads {
		for _, v := range r.Verbs {
			declared = append(declared, v+" "+r.Group+"/"+r.Resource)
		}
		if !slices.Contains(used, "watch "+r.Group+"/"+r.Resource) {
			t.Errorf("KubernetesReads declares %s/%s, but the source never watched it (requests: %v)", r.Group, r.Resource, used)
		}
	}
	for _, u := range used {
		if !slices.Contains(declared, u) {
			t.Errorf("the source made the request %q, which KubernetesReads (and so rbac.yaml) does not declare", u)
		}
	}
	t.Logf("requests made: %v", used)
	// And the ServiceAccount may do nothing else that matters: no Secrets, no writes.
	sa := rc.ServiceAccount("fwdproxy", "fwdproxy-discovery")
	cs, err := kubernetes.NewForConfig(sa)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Secrets("shop").List(rc.ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing secrets as the ServiceAccount: %v, want forbidden", err)
	}
	if err := cs.CoreV1().Services("shop").Delete(rc.ctx, "cart", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("deleting a Service as the ServiceAccount: %v, want forbidden", err)
	}
	if _, err := cs.CoreV1().Namespaces().List(rc.ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing namespaces as the ServiceAccount: %v, want forbidden (the code never reads them)", err)
	}
}

// Readiness as Istio counts it: every endpoint of the Service's EndpointSlices whose pod is
// known gives its service account, ready or not, terminating or not (Istio's endpoint shards keep
// all of them, and the service's accounts are the union over the shards). A pod leaves when it
// leaves the slices: deleted, or without an IP.
func TestRealAPIServerReadiness(t *testing.T) {
	rc := startRealCluster(t)
	rc.namespace("shop")
	rc.gateway("192.0.2.10")
	rc.service("shop", "cart", "http/8080")
	rc.pod("shop", "cart-ready", "cart", "cart-ready", "10.2.0.1", true)
	rc.pod("shop", "cart-unready", "cart", "cart-unready", "10.2.0.2", false)
	rc.pod("shop", "cart-terminating", "cart", "cart-terminating", "10.2.0.3", true)
	// A pod with no IP yet is in no EndpointSlice, so it gives no identity.
	rc.must(rc.cs.CoreV1().Pods("shop").Create(rc.ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "cart-pending", Namespace: "shop",
		Labels: map[string]string{"app": "cart"}}, Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "cart-pending",
		Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app:1"}}}}, metav1.CreateOptions{}))
	h := rc.source(func(k *Kubernetes) { k.Namespaces = []string{"shop"} })
	id := func(sa string) string { return "spiffe://cluster.local/ns/shop/sa/" + sa }
	h.until("the three pods with IPs", func(c *catalog.Catalog) bool {
		return slices.Equal(identitiesOf(c, "cart.shop.svc.cluster.local"), []string{id("cart-ready"), id("cart-terminating"), id("cart-unready")})
	})
	// Graceful deletion: with no kubelet to finish it, the pod stays terminating.
	grace := int64(3600)
	if err := rc.cs.CoreV1().Pods("shop").Delete(rc.ctx, "cart-terminating", metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	waitSlice(t, rc, "shop", "cart", func(conds string) bool {
		return strings.Contains(conds, "cart-terminating:ready=false,terminating=true")
	})
	if c := h.current(); !slices.Equal(identitiesOf(c, "cart.shop.svc.cluster.local"), []string{id("cart-ready"), id("cart-terminating"), id("cart-unready")}) {
		t.Errorf("with a terminating pod: %v", identitiesOf(c, "cart.shop.svc.cluster.local"))
	}
	// Deleted for good: its identity goes.
	zero := int64(0)
	if err := rc.cs.CoreV1().Pods("shop").Delete(rc.ctx, "cart-terminating", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	h.until("the terminated pod gone", func(c *catalog.Catalog) bool {
		return slices.Equal(identitiesOf(c, "cart.shop.svc.cluster.local"), []string{id("cart-ready"), id("cart-unready")})
	})
}

// waitSlice waits until the Service's EndpointSlices' conditions (pod:ready=..,terminating=..)
// satisfy ok.
func waitSlice(t *testing.T, rc *realCluster, ns, svc string, ok func(string) bool) {
	t.Helper()
	var last string
	for range 300 {
		list, err := rc.cs.DiscoveryV1().EndpointSlices(ns).List(rc.ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=" + svc})
		if err != nil {
			t.Fatal(err)
		}
		var parts []string
		for _, s := range list.Items {
			for _, e := range s.Endpoints {
				name := ""
				if e.TargetRef != nil {
					name = e.TargetRef.Name
				}
				b := func(p *bool) bool { return p != nil && *p }
				parts = append(parts, fmt.Sprintf("%s:ready=%v,terminating=%v", name, b(e.Conditions.Ready), b(e.Conditions.Terminating)))
			}
		}
		last = strings.Join(parts, " ")
		if ok(last) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("EndpointSlices of %s/%s: %s", ns, svc, last)
}

// An API server outage is visible (logged, counted, connected=0, status), the last catalog stays,
// and after the API server returns a change is served within seconds.
func TestRealAPIServerOutage(t *testing.T) {
	rc := startRealCluster(t)
	rc.namespace("shop")
	rc.gateway("192.0.2.10")
	rc.service("shop", "cart", "http/8080")
	rc.pod("shop", "cart-1", "cart", "cart", "10.2.0.1", true)
	h := rc.source(func(k *Kubernetes) { k.Namespaces = []string{"shop"} })
	h.until("cart", func(c *catalog.Catalog) bool { return c.Lookup("cart.shop.svc.cluster.local") != nil })
	name := h.src.Name()
	errs := func() float64 { return testutil.ToFloat64(h.src.Metrics.syncErrors.WithLabelValues(name)) }
	up := func() float64 { return testutil.ToFloat64(h.src.Metrics.connected.WithLabelValues(name)) }
	if up() != 1 || errs() != 0 {
		t.Fatalf("before the outage: connected=%v errors=%v", up(), errs())
	}

	rc.StopAPIServer()
	meshtest.Eventually(t, 30*time.Second, "the outage counted and shown", func() bool { return errs() > 0 && up() == 0 })
	st, _ := h.src.Status()
	if st.Connected || st.LastError == "" {
		t.Errorf("status during the outage: %+v", st)
	}
	if !strings.Contains(h.logs.String(), "kubernetes list/watch failing") {
		t.Errorf("the outage was not logged:\n%s", h.logs.String())
	}
	select {
	case c := <-h.cats:
		t.Errorf("a catalog was reported during the outage: %v", hosts(c))
	default:
	}
	// The failures go on being counted while it lasts, and logged at most once per logEvery.
	before := errs()
	meshtest.Eventually(t, 30*time.Second, "retries counted", func() bool { return errs() > before })
	if n := strings.Count(h.logs.String(), "kubernetes list/watch failing"); n > 2 {
		t.Errorf("the outage was logged %d times within seconds; want it rate-limited", n)
	}

	rc.StartAPIServer()
	back := time.Now()
	rc.service("shop", "orders", "http/8081")
	rc.pod("shop", "orders-1", "orders", "orders", "10.2.0.2", true)
	h.untilWithin(60*time.Second, "orders", func(c *catalog.Catalog) bool { return c.Lookup("orders.shop.svc.cluster.local") != nil })
	t.Logf("a change made right after the API server returned was served %v after it was ready", time.Since(back).Round(10*time.Millisecond))
	meshtest.Eventually(t, 30*time.Second, "connected again", func() bool { return up() == 1 })
	if st, _ := h.src.Status(); !st.Connected || st.LastError != "" {
		t.Errorf("status after the outage: %+v", st)
	}
	if !strings.Contains(h.logs.String(), "reachable again") {
		t.Errorf("the recovery was not logged:\n%s", h.logs.String())
	}
}

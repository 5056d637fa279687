package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	listersdiscoveryv1 "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Kubernetes discovers mesh services in one cluster through the API server (informers, so a
// watch, not polling): the Services selected for the fleet, their ports with Istio's protocol
// selection, the SPIFFE identities of the pods behind them (EndpointSlice targetRef -> Pod ->
// service account) and the load-balancer address of the cluster's east-west gateway.
//
// A Service none of whose endpoints resolves to a pod yet (no pods, pods not yet in the cache,
// endpoints without targetRef) has no known workload identity. It is left out of the catalog,
// logged once when it starts being skipped, and counted in
// fwdproxy_discovery_services_skipped{reason="no_workload_identity"}: guessing an identity (e.g.
// the namespace's default service account) would make the fleet accept a certificate the
// service's real workloads may not hold. It appears as soon as its pods do.
type Kubernetes struct {
	// Cluster names the cluster; the source is "kubernetes:<Cluster>".
	Cluster string
	// Client reads the cluster: NewKubeClient, or a Clientset (tests use the fake one).
	Client KubeClient
	// Namespaces to watch; empty watches all.
	Namespaces []string
	// LabelSelector Services must match; empty matches all.
	LabelSelector string
	// ExposeAnnotation, when set, must be on a Service with the value "true".
	ExposeAnnotation string
	// ClusterDomain is the suffix of Service host names, e.g. cluster.local.
	ClusterDomain string
	// TrustDomain of workload identities, e.g. cluster.local.
	TrustDomain string
	Gateway     KubernetesGateway
	// OnGateway is called with the discovered gateway whenever its addresses change (also with
	// no addresses, when the load balancer has none yet). May be nil.
	OnGateway func(DiscoveredGateway)
	// Options validate the emitted catalog; services that fail are left out and counted.
	Options catalog.Options
	// Debounce coalesces bursts of informer events; default 200ms.
	Debounce time.Duration
	Log      *slog.Logger
	Metrics  *SourceMetrics

	mu     sync.Mutex
	health *kubeHealth
}

// KubernetesGateway selects the east-west gateway Service.
type KubernetesGateway struct {
	// Enabled turns discovery on; services then name this gateway and are reached through it.
	Enabled bool
	// Name of the gateway in the catalog and in translation.
	Name string
	// Namespace of the gateway Service; empty searches all namespaces.
	Namespace string
	// LabelSelector of the gateway Service, e.g. istio=eastwestgateway.
	LabelSelector string
	// Port on the load balancer, e.g. 15443.
	Port    uint32
	Network string
}

// DiscoveredGateway is an east-west gateway found in a cluster.
type DiscoveredGateway struct {
	Name    string
	Network string
	Port    uint32
	// Addresses are the load balancer's IPs and host names (status.loadBalancer.ingress), sorted.
	Addresses []string
}

// Name identifies the source in logs and metrics.
func (k *Kubernetes) Name() string { return "kubernetes:" + k.Cluster }

// KubernetesRead is an API read the source makes, in RBAC's terms.
type KubernetesRead struct {
	Group, Resource string
	Verbs           []string
}

// KubernetesReads are all the reads Run makes (reflectors list, then watch), and so exactly what
// deploy/kubernetes/rbac.yaml grants: tests compare the two, and the requests a real API server
// sees against this list.
var KubernetesReads = []KubernetesRead{
	{Group: "", Resource: "services", Verbs: []string{"list", "watch"}},
	{Group: "", Resource: "pods", Verbs: []string{"list", "watch"}},
	{Group: "discovery.k8s.io", Resource: "endpointslices", Verbs: []string{"list", "watch"}},
}

// Skip reasons, the values of the reason label of fwdproxy_discovery_services_skipped.
const (
	SkipNoIdentity = "no_workload_identity"
	SkipNoPorts    = "no_tcp_ports"
	SkipInvalid    = "invalid"
)

type kubeListers struct {
	services []listerscorev1.ServiceLister
	slices   []listersdiscoveryv1.EndpointSliceLister
	pods     []listerscorev1.PodLister
	gateways listerscorev1.ServiceLister
}

// Status is the cluster's connection state: whether its watches are connected, since when, and
// the last error while they are not; running is false before Run starts.
func (k *Kubernetes) Status() (st KubeStatus, running bool) {
	k.mu.Lock()
	h := k.health
	k.mu.Unlock()
	if h == nil {
		return KubeStatus{Source: k.Name()}, false
	}
	return h.status(), true
}

// Run watches the cluster and reports a catalog once the caches have synced and after every
// change (debounced). It returns when ctx is done. Failing list/watch calls are logged
// (rate-limited), counted in fwdproxy_discovery_sync_errors_total and shown by
// fwdproxy_discovery_connected; they are retried every few seconds, and the last reported catalog
// stays in force meanwhile.
func (k *Kubernetes) Run(ctx context.Context, update func(*catalog.Catalog)) error {
	if k.Client == nil {
		return errors.New("no Kubernetes client")
	}
	svcSel, err := labels.Parse(k.LabelSelector)
	if err != nil {
		return fmt.Errorf("labelSelector %q: %w", k.LabelSelector, err)
	}
	// The gateway's selector also keeps the gateway Service itself out of the catalog.
	gwSel := labels.Nothing()
	if k.Gateway.LabelSelector != "" {
		if gwSel, err = labels.Parse(k.Gateway.LabelSelector); err != nil {
			return fmt.Errorf("gateway labelSelector %q: %w", k.Gateway.LabelSelector, err)
		}
	}
	log := k.log()
	trigger := make(chan struct{}, 1)
	poke := func() {
		select {
		case trigger <- struct{}{}:
		default:
		}
	}
	health := newKubeHealth(k.Name(), log, k.Metrics)
	k.mu.Lock()
	k.health = health
	k.mu.Unlock()

	namespaces := k.Namespaces
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	var watches []*kubeWatch
	var ls kubeListers
	c := k.Client
	for _, ns := range namespaces {
		where := ns
		if where == "" {
			where = "all namespaces"
		}
		svc := newKubeWatch("services in "+where, &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				o.LabelSelector = svcSel.String()
				return c.CoreV1().Services(ns).List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				o.LabelSelector = svcSel.String()
				return c.CoreV1().Services(ns).Watch(ctx, o)
			},
		}, c, &corev1.Service{}, nil, health, poke)
		eps := newKubeWatch("endpointslices in "+where, &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return c.DiscoveryV1().EndpointSlices(ns).List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return c.DiscoveryV1().EndpointSlices(ns).Watch(ctx, o)
			},
		}, c, &discoveryv1.EndpointSlice{}, nil, health, poke)
		// Keep only what identity needs of each pod: the cache then holds names and service
		// accounts, not whole pod specs.
		pods := newKubeWatch("pods in "+where, &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return c.CoreV1().Pods(ns).List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return c.CoreV1().Pods(ns).Watch(ctx, o)
			},
		}, c, &corev1.Pod{}, slimPod, health, poke)
		watches = append(watches, svc, eps, pods)
		ls.services = append(ls.services, listerscorev1.NewServiceLister(svc.store))
		ls.slices = append(ls.slices, listersdiscoveryv1.NewEndpointSliceLister(eps.store))
		ls.pods = append(ls.pods, listerscorev1.NewPodLister(pods.store))
	}
	if k.Gateway.Enabled {
		gns := k.Gateway.Namespace
		gw := newKubeWatch("east-west gateway services", &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				o.LabelSelector = gwSel.String()
				return c.CoreV1().Services(gns).List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				o.LabelSelector = gwSel.String()
				return c.CoreV1().Services(gns).Watch(ctx, o)
			},
		}, c, &corev1.Service{}, nil, health, poke)
		watches = append(watches, gw)
		ls.gateways = listerscorev1.NewServiceLister(gw.store)
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	for _, w := range watches {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.reflector.RunWithContext(ctx)
		}()
	}
	log.Info("waiting for the Kubernetes caches to sync", "namespaces", k.Namespaces, "labelSelector", k.LabelSelector)
	synced := make([]cache.InformerSynced, 0, len(watches))
	for _, w := range watches {
		synced = append(synced, w.hasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx done
	}

	debounce := k.Debounce
	if debounce <= 0 {
		debounce = 200 * time.Millisecond
	}
	var lastCat *catalog.Catalog
	var lastGw *DiscoveredGateway
	lastSkipped := map[string]string{}
	for first := true; ; first = false {
		res := k.snapshot(ls, svcSel, gwSel)
		for host, reason := range res.skipped {
			if lastSkipped[host] != reason {
				log.Warn("kubernetes service left out of the catalog", "service", host, "reason", reason, "detail", res.details[host])
			}
		}
		lastSkipped = res.skipped
		k.Metrics.setSkipped(k.Name(), res.skipped)
		if k.Gateway.Enabled && (lastGw == nil || !reflect.DeepEqual(*lastGw, res.gateway)) {
			if len(res.gateway.Addresses) == 0 {
				log.Warn("east-west gateway has no load-balancer address yet; services of this cluster are not reachable until it has one",
					"gateway", k.Gateway.Name, "selector", k.Gateway.LabelSelector)
			} else {
				log.Info("east-west gateway discovered", "gateway", k.Gateway.Name, "addresses", res.gateway.Addresses)
			}
			g := res.gateway
			lastGw = &g
			if k.OnGateway != nil {
				k.OnGateway(g)
			}
		}
		// Recorded before publishing, so whoever sees the catalog also sees the sync's success.
		k.Metrics.success(k.Name(), time.Now())
		if first || !reflect.DeepEqual(lastCat, res.catalog) {
			log.Info("kubernetes catalog updated", "services", len(res.catalog.Services), "skipped", len(res.skipped))
			lastCat = res.catalog
			update(res.catalog)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-trigger:
		}
		select { // let a burst of events settle
		case <-ctx.Done():
			return nil
		case <-time.After(debounce):
		}
	}
}

func (k *Kubernetes) log() *slog.Logger {
	l := k.Log
	if l == nil {
		l = slog.Default()
	}
	return l.With("source", k.Name())
}

// slimPod strips a pod to the fields identity needs.
func slimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // e.g. a DeletedFinalStateUnknown tombstone
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{ServiceAccountName: p.Spec.ServiceAccountName},
	}, nil
}

type kubeSnapshot struct {
	catalog *catalog.Catalog
	gateway DiscoveredGateway
	// skipped maps a Service host to why it was left out; details say more for the log.
	skipped map[string]string
	details map[string]string
}

// snapshot reads the caches and builds the catalog and the gateway.
func (k *Kubernetes) snapshot(ls kubeListers, svcSel, gwSel labels.Selector) kubeSnapshot {
	var svcs []*corev1.Service
	for _, l := range ls.services {
		list, _ := l.List(svcSel)
		svcs = append(svcs, list...)
	}
	var eps []*discoveryv1.EndpointSlice
	for _, l := range ls.slices {
		list, _ := l.List(labels.Everything())
		eps = append(eps, list...)
	}
	podSA := func(ns, name string) (string, bool) {
		for _, l := range ls.pods {
			if p, err := l.Pods(ns).Get(name); err == nil {
				return p.Spec.ServiceAccountName, true
			}
		}
		return "", false
	}
	var gws []*corev1.Service
	if ls.gateways != nil {
		gws, _ = ls.gateways.List(gwSel)
	}
	return k.build(svcs, eps, podSA, gws, gwSel)
}

// build is the pure part of discovery: objects in, catalog and gateway out.
func (k *Kubernetes) build(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice, podSA func(ns, name string) (string, bool), gws []*corev1.Service, gwSel labels.Selector) kubeSnapshot {
	out := kubeSnapshot{catalog: &catalog.Catalog{}, skipped: map[string]string{}, details: map[string]string{}}
	slicesOf := map[string][]*discoveryv1.EndpointSlice{} // ns/service -> slices
	for _, s := range eps {
		if s.AddressType == discoveryv1.AddressTypeFQDN {
			continue // as Istio: FQDN endpoints name no pod, so no identity
		}
		if svc := s.Labels[discoveryv1.LabelServiceName]; svc != "" {
			key := s.Namespace + "/" + svc
			slicesOf[key] = append(slicesOf[key], s)
		}
	}
	created := map[string]time.Time{}
	watched := func(ns string) bool { return len(k.Namespaces) == 0 || slices.Contains(k.Namespaces, ns) }
	svcs = slices.Clone(svcs)
	slices.SortFunc(svcs, func(a, b *corev1.Service) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	for _, svc := range svcs {
		if !watched(svc.Namespace) || svc.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		if gwSel != nil && !gwSel.Empty() && gwSel.Matches(labels.Set(svc.Labels)) {
			continue // the east-west gateway itself is not a destination
		}
		if k.ExposeAnnotation != "" && svc.Annotations[k.ExposeAnnotation] != "true" {
			continue
		}
		host := fmt.Sprintf("%s.%s.svc.%s", svc.Name, svc.Namespace, k.ClusterDomain)
		var ports []catalog.Port
		for _, p := range svc.Spec.Ports {
			proto, ok := IstioProtocol(p)
			if !ok {
				continue
			}
			ports = append(ports, catalog.Port{Number: uint32(p.Port), Protocol: proto, Name: p.Name})
		}
		if len(ports) == 0 {
			out.skipped[host] = SkipNoPorts
			out.details[host] = "the Service has no TCP port (UDP and SCTP cannot be forwarded)"
			continue
		}
		var ids []string
		unresolved := 0
		for _, s := range slicesOf[svc.Namespace+"/"+svc.Name] {
			for _, ep := range s.Endpoints {
				ref := ep.TargetRef
				if ref == nil || ref.Kind != "Pod" {
					unresolved++
					continue
				}
				ns := ref.Namespace
				if ns == "" {
					ns = s.Namespace
				}
				sa, ok := podSA(ns, ref.Name)
				if !ok {
					unresolved++
					continue
				}
				if sa == "" {
					sa = "default" // what the API server assigns when a pod names none
				}
				ids = append(ids, fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", k.TrustDomain, ns, sa))
			}
		}
		if len(ids) == 0 {
			out.skipped[host] = SkipNoIdentity
			out.details[host] = fmt.Sprintf("no endpoint resolves to a pod's service account yet (%d unresolved endpoints); it is added when its pods appear", unresolved)
			continue
		}
		created[host] = svc.CreationTimestamp.Time
		s := catalog.Service{Host: host, Ports: ports, Identities: ids}
		if k.Gateway.Enabled {
			s.Gateways = []string{k.Gateway.Name}
		}
		out.catalog.Services = append(out.catalog.Services, s)
	}
	// On a collision (e.g. two Services claiming one TCP port) the older Service keeps it, as
	// Istio resolves conflicts: a new Service never knocks out one that is already serving.
	slices.SortStableFunc(out.catalog.Services, func(a, b catalog.Service) int { return created[a.Host].Compare(created[b.Host]) })
	merged, problems := Merge(k.Options, out.catalog)
	for _, p := range problems {
		msg := p.Error()
		for _, s := range out.catalog.Services {
			if strings.Contains(msg, "service "+s.Host+" ") && merged.Lookup(s.Host) == nil {
				out.skipped[s.Host] = SkipInvalid
				out.details[s.Host] = msg
			}
		}
	}
	out.catalog = merged

	gw := DiscoveredGateway{Name: k.Gateway.Name, Network: k.Gateway.Network, Port: k.Gateway.Port}
	for _, svc := range gws {
		if k.Gateway.Namespace != "" && svc.Namespace != k.Gateway.Namespace {
			continue
		}
		for _, in := range svc.Status.LoadBalancer.Ingress {
			switch {
			case in.IP != "":
				gw.Addresses = append(gw.Addresses, in.IP)
			case in.Hostname != "":
				gw.Addresses = append(gw.Addresses, in.Hostname)
			}
		}
	}
	slices.Sort(gw.Addresses)
	gw.Addresses = slices.Compact(gw.Addresses)
	out.gateway = gw
	return out
}

// IstioProtocol applies Istio's protocol selection to a Service port (pilot's
// kube.ConvertProtocol): appProtocol first, including Kubernetes' standard names, then the port
// name's prefix before the first '-', case-insensitively. It maps Istio's protocols onto what the
// fleet forwards: http, http2 and grpc are routed by Host; grpc-web is HTTP/1.1; everything else
// (tcp, tls, https, mongo, mysql, redis, and names Istio would sniff) is forwarded as TCP, as Istio
// treats a port it does not sniff. UDP and SCTP ports cannot be forwarded (ok is false).
func IstioProtocol(p corev1.ServicePort) (proto catalog.Protocol, ok bool) {
	if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
		return "", false
	}
	name := p.Name
	if p.AppProtocol != nil {
		name = *p.AppProtocol
		switch name {
		case "kubernetes.io/h2c":
			return catalog.HTTP2, true
		case "kubernetes.io/ws":
			return catalog.HTTP, true
		case "kubernetes.io/wss":
			return catalog.TCP, true
		}
	}
	name = strings.ToLower(name)
	if strings.HasPrefix(name, "grpc-web") {
		return catalog.HTTP, true
	}
	if i := strings.IndexByte(name, '-'); i >= 0 {
		name = name[:i]
	}
	switch name {
	case "http":
		return catalog.HTTP, true
	case "http2":
		return catalog.HTTP2, true
	case "grpc":
		return catalog.GRPC, true
	case "udp":
		return "", false
	}
	return catalog.TCP, true
}

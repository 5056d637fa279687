package daemon

import (
	"context"
	"fmt"
	"slices"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
	"github.com/fwdproxy/fwdproxy/pkg/gateways"
)

// catalogOptions validates the merged catalog against the gateways the config names (configured,
// and to be discovered in Kubernetes) and any other gateway that currently has addresses. A
// service whose gateways have no address yet passes here: translation leaves it out, reported
// as no_gateway_address, until one resolves.
func (d *Daemon) catalogOptions(resolved []controlplane.Gateway) catalog.Options {
	opts := d.cfg.CatalogOptions()
	for _, g := range resolved {
		if !slices.Contains(opts.Gateways, g.Name) {
			opts.Gateways = append(opts.Gateways, g.Name)
		}
	}
	slices.Sort(opts.Gateways)
	return opts
}

// kubernetesSources are the configured Kubernetes clusters' discovery sources.
func (d *Daemon) kubernetesSources() []discovery.Source {
	metrics := discovery.NewSourceMetrics(d.Registry)
	if len(d.cfg.Discovery.Kubernetes) == 0 {
		return nil
	}
	d.kube = gateways.NewDiscovered()
	var out []discovery.Source
	for i, k := range d.cfg.Discovery.Kubernetes {
		src := &discovery.Kubernetes{
			Cluster:          k.Name,
			Namespaces:       k.Namespaces,
			LabelSelector:    k.LabelSelector,
			ExposeAnnotation: k.ExposeAnnotation,
			ClusterDomain:    k.ClusterDomain,
			TrustDomain:      k.TrustDomain,
			Gateway: discovery.KubernetesGateway{
				Enabled: k.Gateway.Enabled(), Name: k.Gateway.Name, Namespace: k.Gateway.Namespace,
				LabelSelector: k.Gateway.LabelSelector, Port: k.Gateway.Port, Network: k.Gateway.Network,
			},
			OnGateway: d.kube.Set,
			Options:   d.cfg.CatalogOptions(),
			Log:       d.log.With("component", "discovery"),
			Metrics:   metrics,
		}
		out = append(out, &kubeSource{Kubernetes: src, field: fmt.Sprintf("discovery.kubernetes[%d]", i), cluster: k, dir: d.cfg})
	}
	return out
}

// kubernetesStatus is each cluster's connection, for fwdproxy status.
func (d *Daemon) kubernetesStatus() []admin.KubernetesSource {
	var out []admin.KubernetesSource
	for _, s := range d.sources {
		ks, ok := s.(*kubeSource)
		if !ok {
			continue
		}
		st, running := ks.Status()
		out = append(out, admin.KubernetesSource{Source: st.Source, Running: running, Connected: st.Connected, Since: st.Since, LastError: st.LastError})
	}
	return out
}

// kubeSource connects to the cluster when it starts, so a bad kubeconfig fails the daemon's
// start with a message naming the field.
type kubeSource struct {
	*discovery.Kubernetes
	field   string
	cluster config.KubernetesCluster
	dir     *config.Config
}

func (s *kubeSource) Run(ctx context.Context, update func(*catalog.Catalog)) error {
	if s.Kubernetes.Client == nil { // tests may set a client
		client, err := kubeClient(s.dir.Path(s.cluster.Kubeconfig), s.cluster.Context)
		if err != nil {
			return fmt.Errorf("%s (%s): %w", s.field, s.cluster.Name, err)
		}
		s.Kubernetes.Client = client
	}
	return s.Kubernetes.Run(ctx, update)
}

// kubeClient builds a client from a kubeconfig file and context, or from the in-cluster service
// account when path is empty.
func kubeClient(path, context string) (discovery.KubeClient, error) {
	var rc *rest.Config
	var err error
	if path == "" {
		if rc, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("kubeconfig is empty, so the in-cluster service account is used, but: %w; set kubeconfig to a file", err)
		}
	} else {
		loader := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
			&clientcmd.ClientConfigLoadingRules{ExplicitPath: path}, &clientcmd.ConfigOverrides{CurrentContext: context})
		if rc, err = loader.ClientConfig(); err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
		}
	}
	rc.UserAgent = "fwdproxy"
	return discovery.NewKubeClient(rc)
}

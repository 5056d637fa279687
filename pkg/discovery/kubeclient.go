package discovery

import (
	"k8s.io/client-go/rest"

	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	discoveryv1client "k8s.io/client-go/kubernetes/typed/discovery/v1"
)

// KubeClient is the part of the Kubernetes API the source reads: Services and Pods (core/v1)
// and EndpointSlices (discovery.k8s.io/v1). A kubernetes.Interface (a Clientset, or the fake
// one in tests) is one; NewKubeClient builds only these two typed clients, so the binary does
// not carry the other forty-odd API groups' clients and apply configurations.
type KubeClient interface {
	CoreV1() corev1client.CoreV1Interface
	DiscoveryV1() discoveryv1client.DiscoveryV1Interface
}

// NewKubeClient builds the typed clients the source uses from a REST config, as
// kubernetes.NewForConfig does for all of them: one HTTP client (so one transport) shared by
// both, each with client-go's default rate limit unless the config sets one.
func NewKubeClient(c *rest.Config) (KubeClient, error) {
	cfg := *c
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	hc, err := rest.HTTPClientFor(&cfg)
	if err != nil {
		return nil, err
	}
	var k kubeClient
	if k.core, err = corev1client.NewForConfigAndClient(&cfg, hc); err != nil {
		return nil, err
	}
	if k.discovery, err = discoveryv1client.NewForConfigAndClient(&cfg, hc); err != nil {
		return nil, err
	}
	return k, nil
}

type kubeClient struct {
	core      *corev1client.CoreV1Client
	discovery *discoveryv1client.DiscoveryV1Client
}

func (k kubeClient) CoreV1() corev1client.CoreV1Interface { return k.core }

func (k kubeClient) DiscoveryV1() discoveryv1client.DiscoveryV1Interface { return k.discovery }

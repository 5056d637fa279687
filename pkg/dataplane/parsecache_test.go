package dataplane

import (
	"net/http"
	"strings"
	"testing"
	"time"

	clusterpb "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
)

// A delta response costs what it changed: listeners and clusters that did not change are not
// parsed again, a bad one is rejected while the last good configuration serves, and going back
// to it parses nothing new.
func TestUnchangedResourcesAreNotReparsed(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port, tcpPort := freePort(t), freePort(t)
	opts := e.options(mesh.addr)
	cat := manyHTTPServices(50, port)
	e.pushApplied(cat, opts, nil)
	listeners, clusters := e.dp.parsedListeners.parses.Load(), e.dp.parsedClusters.parses.Load()
	if listeners < 1 || clusters < 50 {
		t.Fatalf("parsed %d listeners and %d clusters, want at least 1 and 50", listeners, clusters)
	}

	// One service changes (a second identity: its cluster's SAN matchers), one is added with a
	// TCP port of its own (a listener and a cluster).
	cat = manyHTTPServices(50, port)
	cat.Services[7].Identities = append(cat.Services[7].Identities, "spiffe://cluster.local/ns/default/sa/other")
	cat.Services = append(cat.Services, catalog.Service{Host: "tcp.default.svc.cluster.local",
		Ports: []catalog.Port{{Number: tcpPort, Protocol: catalog.TCP}}, Identities: []string{reviewsID}})
	e.pushApplied(cat, opts, nil)
	if n := e.dp.parsedListeners.parses.Load() - listeners; n != 1 {
		t.Errorf("one listener added: %d listeners parsed, want 1", n)
	}
	if n := e.dp.parsedClusters.parses.Load() - clusters; n != 2 {
		t.Errorf("one cluster changed and one added: %d clusters parsed, want 2", n)
	}
	if st := e.dp.Status(); len(st.Clusters) != 51 || len(st.Listeners) != 2 {
		t.Fatalf("serving %d clusters and %d listeners, want 51 and 2", len(st.Clusters), len(st.Listeners))
	}

	// A bad cluster: rejected, the last good configuration keeps serving.
	clusters = e.dp.parsedClusters.parses.Load()
	bad := controlplane.ClusterName(port, "", cat.Services[3].Host)
	e.push(cat, opts, func(r *controlplane.Resources) {
		for _, c := range r.Clusters {
			if c.Name == bad {
				c.LbPolicy = clusterpb.Cluster_LEAST_REQUEST
			}
		}
	})
	eventually(t, "the rejection", func() bool { return strings.Contains(e.dp.Status().LastRejection, "lb_policy") })
	if got := e.dp.Status().LastRejection; !strings.Contains(got, bad) {
		t.Errorf("rejection %q does not name cluster %s", got, bad)
	}
	if n := e.dp.parsedClusters.parses.Load() - clusters; n != 1 {
		t.Errorf("one bad cluster: %d clusters parsed, want 1", n)
	}
	for _, i := range []int{3, 7, 49} {
		resp := get(t, &http.Client{}, port, cat.Services[i].Host, "/")
		if b := body(t, resp); resp.StatusCode != http.StatusOK {
			t.Errorf("%s after the rejection: %d %q", cat.Services[i].Host, resp.StatusCode, b)
		}
	}

	// Back to the good configuration: what comes again was parsed before, or is parsed once.
	clusters = e.dp.parsedClusters.parses.Load()
	e.push(cat, opts, func(r *controlplane.Resources) {
		for _, c := range r.Clusters {
			if c.Name == bad {
				// A new version, so the control plane sends it again. A new Duration: the
				// translation shares one among all its clusters.
				c.ConnectTimeout = durationpb.New(c.ConnectTimeout.AsDuration() + time.Nanosecond)
			}
		}
	})
	eventually(t, "the good configuration accepted again", func() bool {
		return e.dp.parsedClusters.parses.Load() > clusters && e.dp.Status().Ready
	})
	if n := e.dp.parsedClusters.parses.Load() - clusters; n != 1 {
		t.Errorf("one cluster changed after the rejection: %d clusters parsed, want 1", n)
	}
}

package dataplane

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// manyHTTPServices is n services on one shared HTTP port, each with its own cluster.
func manyHTTPServices(n int, port uint32) *catalog.Catalog {
	c := &catalog.Catalog{}
	for i := range n {
		c.Services = append(c.Services, catalog.Service{
			Host:       fmt.Sprintf("svc-%05d.ns-%03d.svc.cluster.local", i, i%100),
			Ports:      []catalog.Port{{Number: port, Protocol: catalog.HTTP}},
			Identities: []string{reviewsID},
		})
	}
	return c
}

// A clusters response larger than gRPC's default 4 MiB receive limit is taken and served.
func TestResponseOverFourMiBIsAccepted(t *testing.T) {
	e := newEnv(t, 0)
	mesh := newMeshServer(t, e.ca, reviewsID, false)
	port := freePort(t)
	snap := e.pushApplied(manyHTTPServices(10000, port), e.options(mesh.addr), nil)
	size := 0
	for _, r := range snap.Cache.GetResources(resource.ClusterType) {
		size += proto.Size(r)
	}
	if size <= 4<<20 {
		t.Fatalf("the clusters are %d bytes; the test needs more than 4 MiB", size)
	}
	resp := get(t, &http.Client{}, port, "svc-09999.ns-099.svc.cluster.local", "/")
	if b := body(t, resp); resp.StatusCode != http.StatusOK {
		t.Fatalf("%d %q", resp.StatusCode, b)
	}
}

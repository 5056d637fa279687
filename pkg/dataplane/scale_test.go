package dataplane

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
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

// A response over the data plane's receive limit ends the stream before anything of it is read:
// the data plane says so at error level, counts it, keeps serving its last good configuration
// (still serving, so the daemon stays ready on it) and retries with backoff.
func TestResponseOverTheLimitKeepsTheLastGoodConfig(t *testing.T) {
	logs := &meshtest.SyncBuffer{}
	e := newEnvWith(t, 0, func(o *Options) {
		o.MaxMessageBytes = 64 << 10
		o.Log = slog.New(slog.NewTextHandler(logs, nil))
	})
	mesh := newMeshServer(t, e.ca, reviewsID, true)
	port := freePort(t)
	tcp := reviews(port, catalog.TCP)
	good := e.pushApplied(&catalog.Catalog{Services: []catalog.Service{tcp}}, e.options(mesh.addr), nil)

	big := manyHTTPServices(400, freePort(t)) // about 200 KB of clusters
	big.Services = append(big.Services, tcp)
	e.push(big, e.options(mesh.addr), nil)
	eventually(t, "the oversized response counted", func() bool {
		return counter(t, e.dp.metrics.xdsReceiveErrors.WithLabelValues("too_large")) >= 2
	})
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "larger than this data plane takes") {
		t.Errorf("no error-level log line says the configuration was too large:\n%s", logs.String())
	}
	st := e.dp.Status()
	if !st.Serving || st.Versions["cluster"] != good.Cache.GetVersion(resource.ClusterType) {
		t.Errorf("status %+v: want serving the last good clusters %s", st, good.Cache.GetVersion(resource.ClusterType))
	}
	if !strings.Contains(st.LastRejection, "65536") {
		t.Errorf("last rejection %q does not name the limit", st.LastRejection)
	}
	c := dialTCP(t, port)
	c.line(t)
	c.ping(t, "still serving")
}

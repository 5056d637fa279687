//go:build linux

package e2e_test

import (
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// One service in two clusters, each reached through its own east-west gateway: the local one
// (priority 0) takes all traffic; when it dies, its endpoint is ejected and the other cluster's
// gateway (priority 1) takes over, on both data planes, under load. Requests that fail before
// the ejection are reported; after it none may fail.
func TestMultiClusterFailoverBuiltin(t *testing.T) {
	dp := builtin
	dp.priorities = []uint32{0, 1}
	runMultiClusterFailover(t, dp)
}

func TestMultiClusterFailoverEnvoy(t *testing.T) {
	dp := envoyDataplane(t)
	dp.priorities = []uint32{0, 1}
	runMultiClusterFailover(t, dp)
}

var errNotYet = errors.New("not yet")

func runMultiClusterFailover(t *testing.T, dp dataplane) {
	e := start(t, goMesh, dp)
	host, port := "productpage.bookinfo.svc.cluster.local", e.ports.http
	for i := range 20 {
		if code, _, err := e.get("", host, port, "/"); err != nil || code != 200 {
			t.Fatalf("request %d: %d %v", i, code, err)
		}
	}
	if n, _ := e.mesh.routed(1); n != 0 {
		t.Fatalf("the priority-1 gateway carried %d connections while the local one was up", n)
	}
	local, _ := e.mesh.routed(0)
	if local == 0 {
		t.Fatal("the local gateway carried nothing")
	}

	// Load: 4 clients in a loop, each request recorded as ok or failed, in order.
	type result struct {
		at time.Time
		ok bool
	}
	var (
		mu      sync.Mutex
		results []result
		stop    atomic.Bool
		wg      sync.WaitGroup
	)
	for c := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := e.client("127.0.0." + strconv.Itoa(c+1))
			for !stop.Load() {
				req, err := http.NewRequest(http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(port)+"/", nil)
				if err != nil {
					panic(err)
				}
				req.Host = host
				resp, err := client.Do(req)
				ok := false
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					ok = resp.StatusCode == 200
				}
				mu.Lock()
				results = append(results, result{time.Now(), ok})
				mu.Unlock()
			}
		}()
	}
	countOK := func() (ok, failed int) {
		mu.Lock()
		defer mu.Unlock()
		for _, r := range results {
			if r.ok {
				ok++
			} else {
				failed++
			}
		}
		return
	}
	e.eventually("load running", func() error {
		if ok, _ := countOK(); ok < 50 {
			return errNotYet
		}
		return nil
	})
	e.mesh.stopGateway(0)
	stopped := time.Now()
	// Ejection: for the built-in data plane its counter; for both, the other gateway serving.
	e.eventually("failover to the priority-1 gateway", func() error {
		if n, _ := e.mesh.routed(1); n == 0 {
			return errNotYet
		}
		if e.builtin && e.metric("fwdproxy_dataplane_ejections_total", `cluster="outbound|`+strconv.Itoa(port)+`||`+host+`"`) < 1 {
			return errNotYet
		}
		return nil
	})
	ejected := time.Now()
	mu.Lock()
	mark := len(results)
	mu.Unlock()
	// A window well inside baseEjectionTime (30s), so the dead endpoint stays ejected.
	e.eventually("load after the ejection", func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(results)-mark < 400 {
			return errNotYet
		}
		return nil
	})
	stop.Store(true)
	wg.Wait()
	before, after, total := 0, 0, 0
	for i, r := range results {
		if !r.at.After(stopped) {
			continue
		}
		total++
		if !r.ok {
			if i < mark {
				before++
			} else {
				after++
			}
		}
	}
	t.Logf("%s: %d requests after the local gateway stopped; %d failed before its ejection (%v after it stopped), %d after",
		dp.name, total, before, ejected.Sub(stopped).Round(time.Millisecond), after)
	if after != 0 {
		t.Errorf("%d requests failed after the ejection; want 0", after)
	}
}

// Command envoyscale measures Envoy at catalog scale, run the way production runs it: the
// fwdproxy daemon (pkg/daemon, in this process) with dataplane: envoy writes Envoy's bootstrap,
// supervises Envoy and feeds it over ADS/SDS, in front of a stand-in mesh (two AUTO_PASSTHROUGH
// gateways and mTLS sidecars from internal/meshtest). The catalog is a file the daemon watches.
//
// Each run goes through four steps and reports, per step, Envoy's VmRSS and VmHWM
// (/proc/PID/status) and:
//
//	start              a one-service catalog; Envoy starts: times from Envoy's start;
//	large catalog      the file is rewritten with -services services x 2 ports (one HTTP port
//	                   shared by Host, one TCP port each): catalog write -> snapshot served (the
//	                   control plane: reload, translation, validation), then from the snapshot
//	                   being served: Envoy's CDS and LDS updates applied, Envoy's ACK, the first
//	                   successful HTTP request and TCP connection through Envoy to a service that
//	                   is new in this step;
//	one service added  a TCP listener, a virtual host and two clusters more: the same;
//	envoy restart      Envoy is killed (SIGKILL) and the daemon restarts it with the catalog in
//	                   place: times from the new Envoy's start.
//
// "Served" is fwdproxy_snapshot_last_update_timestamp_seconds, when the daemon handed the
// snapshot to its xDS server. The ACK is the xDS server's own record (Status().AckedCurrent: the
// current listeners, clusters and secrets acknowledged). CDS and LDS applied are Envoy's
// cluster_manager.cds.update_time and listener_manager.lds.update_time. The xDS streams lost
// during a step are counted (the daemon's server closing an Envoy that is too busy to answer
// keepalive pings shows there). After each step the program waits until Envoy warms nothing,
// checks it holds every listener and cluster and that the daemon counted no NACK. The ADS flavour
// (state of the world or delta) is read from the bootstrap the daemon wrote and printed.
//
// Usage: go run ./bench/envoyscale [-services 10000] [-runs 1] (make bench-envoy). Envoy listens
// on -listen (127.0.0.2: a loopback address other programs seldom bind, so that taking 10,000
// ports there does not collide with theirs) at -services+1 TCP ports from -tcp-base and an HTTP
// port after them. Envoy holds a socket per listener per worker: the program raises its
// open-file limit (Envoy inherits it) to 1048576 when allowed, as the machine image's systemd
// units do (LimitNOFILE), and where the limit stays too low for one worker per core it runs
// Envoy with fewer workers and says so. Envoy's own output goes to envoy.log in the work
// directory (-keep keeps it).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/internal/procstat"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
)

const (
	fleetID = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	probeID = "spiffe://cluster.local/ns/bench/sa/probe"
	// fdMargin is what Envoy needs besides its listener sockets: xDS, admin, upstream
	// connections, files.
	fdMargin = 2000
)

var (
	services    = flag.Int("services", 10000, "services in the large catalog (each with a shared HTTP port and a TCP port of its own)")
	runs        = flag.Int("runs", 1, "runs (each with a new daemon and Envoy); the table shows medians")
	listenAddr  = flag.String("listen", "127.0.0.2", "loopback address Envoy's service listeners bind")
	tcpBase     = flag.Int("tcp-base", 0, "first service port: TCP ports tcp-base..tcp-base+services and the HTTP port after them, on -listen (0: the first free range from 20000 down to 10000, below the ephemeral ports)")
	concurrency = flag.Int("concurrency", 0, "Envoy --concurrency (0: Envoy's default, one worker per core as in production, or fewer when the open-file limit is too low for that)")
	timeout     = flag.Duration("timeout", 5*time.Minute, "limit for each step")
	xdsProtocol = flag.String("xds-protocol", "delta", "how Envoy subscribes: delta or sotw (the daemon's envoy.xdsProtocol)")
	changes     = flag.Int("changes", 20, "one-service changes at full scale after the steps, each timed from the snapshot served to Envoy's ACK")
	scrapeEvery = flag.Duration("scrape-every", 0, "during the one-service changes, scrape Envoy's /stats/prometheus this often, as Prometheus does (0: no scrapes)")
	scrapeJob   = flag.String("scrape-config", "deploy/observability/prometheus/prometheus.yml", "Prometheus config whose fwdproxy-envoy job's params (usedonly, filter) the scrapes use (empty: usedonly alone)")
	keep        = flag.Bool("keep", false, "keep the work directory (config, catalogs, daemon and Envoy logs)")
)

// stdout and stderr are this program's; os.Stdout and os.Stderr, which the daemon hands to
// Envoy, point at envoy.log during a run.
var stdout, stderr = os.Stdout, os.Stderr

func main() {
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(stderr, "envoyscale:", err)
		os.Exit(1)
	}
}

// step is one row of the results; durations in seconds, NaN where they do not apply.
type step struct {
	name                  string
	services              int
	served                float64 // catalog write -> snapshot served
	cds, lds, ack         float64 // origin -> Envoy's CDS update, LDS update, the ACK
	cpu                   float64 // Envoy's CPU seconds from the origin to the ACK and first good requests
	httpOK, tcpOK         float64 // origin -> first good request / connection
	drops                 int     // xDS streams lost during the step
	rssMiB, hwmMiB        float64 // Envoy
	daemonRSS             float64 // this process: the daemon, its xDS server and the mesh stand-ins
	listeners, clusters   int
	statsQuery, settleFor float64 // informational: one admin /stats query, warming after the ACK
}

// scrapeQuery is the query of every scrape: the fwdproxy-envoy job's params (-scrape-config),
// which scrapeDesc names.
var scrapeQuery, scrapeDesc = "usedonly", "usedonly"

// readScrapeJob sets scrapeQuery from the fwdproxy-envoy job of the Prometheus config at path.
func readScrapeJob(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("-scrape-config: %w (run from the repository's root, or pass -scrape-config '' for usedonly alone)", err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName string              `yaml:"job_name"`
			Params  map[string][]string `yaml:"params"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		return fmt.Errorf("-scrape-config %s: %w", path, err)
	}
	for _, sc := range cfg.ScrapeConfigs {
		if sc.JobName == "fwdproxy-envoy" {
			scrapeQuery = url.Values(sc.Params).Encode()
			scrapeDesc = "the fwdproxy-envoy job's params in " + path
			return nil
		}
	}
	return fmt.Errorf("-scrape-config %s: no fwdproxy-envoy job", path)
}

func run(ctx context.Context) error {
	if *scrapeJob != "" {
		if err := readScrapeJob(*scrapeJob); err != nil {
			return err
		}
	}
	if *services < 2 || *tcpBase != 0 && (*tcpBase < 1024 || *tcpBase+*services+1 > 65535) {
		return fmt.Errorf("-services %d with -tcp-base %d: need 2 or more services and ports within 1024..65535", *services, *tcpBase)
	}
	if ip := net.ParseIP(*listenAddr); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-listen %q: want a loopback IP address", *listenAddr)
	}
	envoy, err := meshtest.EnvoyPath()
	if err != nil {
		return err
	}
	limit := raiseFileLimit()
	workers, workersNote := envoyWorkers(limit)
	version, _ := exec.Command(envoy, "--version").Output()
	var all [][]step
	var scrapes []scrape
	var allChanges []changeStat
	var ads string
	for r := 1; r <= *runs; r++ {
		steps, flavour, sc, cs, err := runOnce(ctx, envoy, workers)
		if err != nil {
			return fmt.Errorf("run %d: %w", r, err)
		}
		ads = flavour
		all = append(all, steps)
		scrapes = append(scrapes, sc)
		allChanges = append(allChanges, cs...)
		fmt.Fprintf(stderr, "run %d done\n", r)
	}

	fmt.Fprintf(stdout, "\nEnvoy at scale: %s, run by the daemon (dataplane: envoy); ADS %s; %d cores; %s; open-file limit %d; %d run(s), medians\n\n",
		envoyVersion(string(version)), ads, runtime.NumCPU(), workersNote, limit, *runs)
	fmt.Fprintln(stdout, "| step | services | write → served s | → CDS applied s | → LDS applied s | → ACK s | → first HTTP OK s | → first TCP OK s | Envoy CPU s | xDS streams lost | Envoy RSS MiB | Envoy peak RSS MiB | daemon RSS after GC MiB |")
	fmt.Fprintln(stdout, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for i := range all[0] {
		col := func(f func(step) float64) []float64 {
			var v []float64
			for _, steps := range all {
				v = append(v, f(steps[i]))
			}
			return v
		}
		s := all[0][i]
		fmt.Fprintf(stdout, "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", s.name, s.services,
			secs(col(func(s step) float64 { return s.served })), secs(col(func(s step) float64 { return s.cds })),
			secs(col(func(s step) float64 { return s.lds })), secs(col(func(s step) float64 { return s.ack })),
			secs(col(func(s step) float64 { return s.httpOK })), secs(col(func(s step) float64 { return s.tcpOK })),
			fmt.Sprintf("%.1f", median(col(func(s step) float64 { return s.cpu }))),
			num(col(func(s step) float64 { return float64(s.drops) })),
			num(col(func(s step) float64 { return s.rssMiB })), num(col(func(s step) float64 { return s.hwmMiB })),
			num(col(func(s step) float64 { return s.daemonRSS })))
	}
	fmt.Fprintln(stdout, "\nTimes count from the snapshot being served (catalog changes) or from Envoy's start (start, restart).")
	fmt.Fprintln(stdout, "CDS/LDS applied: Envoy's update_time of those subscriptions, over the runs where the step lost no xDS stream (after")
	fmt.Fprintln(stdout, "a lost stream Envoy gets the whole state again and the last update is a re-application). ACK: the daemon's xDS server")
	fmt.Fprintln(stdout, "saw Envoy acknowledge the current listeners, clusters and secrets. First HTTP/TCP OK: a request by Host and a TCP echo through Envoy")
	fmt.Fprintln(stdout, "to a service new in that step. Envoy CPU: utime+stime of the envoy process over the same span (from its start on")
	fmt.Fprintln(stdout, "a restart), steadier than the times on a shared machine. After each step Envoy held every listener and cluster,")
	fmt.Fprintln(stdout, "warming none, and sent no NACK.")
	fmt.Fprintln(stdout, "The daemon RSS is this process's (the daemon, its xDS server and the mesh stand-ins) after a GC returned free memory.")
	if len(allChanges) > 0 {
		var served, acks, bytes []float64
		for _, c := range allChanges {
			served, acks, bytes = append(served, c.served), append(acks, c.ack), append(bytes, c.rxBytes)
		}
		fmt.Fprintf(stdout, "One-service changes at %d services (%d, each a new identity for one service: its two clusters): write -> served p50 %.3f s p99 %.3f s; served -> Envoy's ACK p50 %.3f s p99 %.3f s; bytes received by Envoy from the control plane per change (mean over the changes): %.0f.\n",
			*services+1, len(allChanges), quantile(served, 0.5), quantile(served, 0.99), quantile(acks, 0.5), quantile(acks, 0.99), median(bytes))
	}
	var sec, mb, lines []float64
	for _, sc := range scrapes {
		sec, mb, lines = append(sec, sc.seconds), append(mb, sc.bytes/1e6), append(lines, sc.lines)
	}
	fmt.Fprintf(stdout, "One scrape of Envoy's /stats/prometheus (%s, as deploy/observability scrapes every 15s) at %d services: %.1f s, %.0f MB, %.0f lines.\n", scrapeDesc,
		*services+1, median(sec), median(mb), median(lines))
	return nil
}

// envoyWorkers decides Envoy's --concurrency: the flag, or Envoy's default (one worker per core)
// when the open-file limit allows a socket per listener per worker, else as many as it allows.
func envoyWorkers(limit uint64) (workers int, note string) {
	listeners := *services + 2
	fit := int((int64(limit) - fdMargin) / int64(listeners))
	switch {
	case *concurrency > 0:
		note = fmt.Sprintf("Envoy --concurrency %d", *concurrency)
		if *concurrency > fit {
			note += fmt.Sprintf(" (more than the open-file limit allows for %d listeners: expect Envoy to abort)", listeners)
		}
		return *concurrency, note
	case fit >= runtime.NumCPU():
		return 0, fmt.Sprintf("Envoy's default concurrency (%d workers)", runtime.NumCPU())
	default:
		w := max(1, fit)
		fmt.Fprintf(stderr, "envoyscale: the open-file limit %d does not hold %d listeners x %d workers; running Envoy with --concurrency %d\n",
			limit, listeners, runtime.NumCPU(), w)
		return w, fmt.Sprintf("Envoy --concurrency %d, not its default %d: the open-file limit %d cannot hold a socket per listener per worker for %d", w, runtime.NumCPU(), limit, runtime.NumCPU())
	}
}

// runOnce starts a mesh, the daemon and Envoy, goes through the steps, and stops them.
func runOnce(ctx context.Context, envoy string, workers int) (steps []step, ads string, sc scrape, cs []changeStat, err error) {
	n := *services
	if err := choosePorts(n + 2); err != nil {
		return nil, "", scrape{}, nil, err
	}
	dir, err := os.MkdirTemp("", "envoyscale-")
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	if *keep {
		fmt.Fprintln(stderr, "work directory:", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	var gws []*meshtest.Gateway
	for range 2 {
		gw, err := meshtest.StartGateway("127.0.0.1:0")
		if err != nil {
			return nil, "", scrape{}, nil, err
		}
		defer gw.Close()
		gws = append(gws, gw)
	}
	hs, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: "probe-http", SPIFFEID: probeID, CA: ca, Protocol: meshtest.HTTP})
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	defer hs.Close()
	ts, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: "probe-tcp", SPIFFEID: probeID, CA: ca, Protocol: meshtest.TCP})
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	defer ts.Close()
	httpPort := *tcpBase + n + 1
	cat := &catalogFile{path: filepath.Join(dir, "catalog.yaml"), httpPort: httpPort}
	// The services probed in the steps reach the sidecars; the others have no route at the
	// gateways and are never called.
	for _, i := range []int{0, n - 1, n} {
		for _, gw := range gws {
			gw.Route(meshtest.Target{Host: host(i), Port: uint32(httpPort)}, hs.Addr())
			gw.Route(meshtest.Target{Host: host(i), Port: uint32(*tcpBase + i)}, ts.Addr())
		}
	}
	leaf, err := ca.IssueFor(fleetID, 24*time.Hour)
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	if err := os.Mkdir(filepath.Join(dir, "certs"), 0o700); err != nil {
		return nil, "", scrape{}, nil, err
	}
	if _, _, _, err := leaf.WriteFiles(filepath.Join(dir, "certs"), ca.RootPEM); err != nil {
		return nil, "", scrape{}, nil, err
	}
	if err := cat.write(1); err != nil {
		return nil, "", scrape{}, nil, err
	}
	var free [4]int
	for i := range free {
		if free[i], err = meshtest.FreePort(); err != nil {
			return nil, "", scrape{}, nil, err
		}
	}
	args := []string{"--log-level", "warning"}
	if workers > 0 {
		args = append(args, "--concurrency", strconv.Itoa(workers))
	}
	argsJSON, _ := json.Marshal(args)
	bootstrap := filepath.Join(dir, "envoy-bootstrap.json")
	cfgYAML := fmt.Sprintf(`node: {id: envoyscale}
gateways:
  - {name: eastwest-a, address: %s, port: %s}
  - {name: eastwest-b, address: %s, port: %s}
identity:
  spiffeID: %s
  files: {certChain: certs/cert-chain.pem, privateKey: certs/key.pem, roots: certs/root-cert.pem}
discovery: {files: [catalog.yaml]}
listen: {address: %s, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: 127.0.0.1:%d}
admin: {socket: admin.sock}
dataplane: envoy
envoy: {binary: %q, adminAddress: 127.0.0.1:%d, bootstrapPath: %q, drainTime: 1s, args: %s, xdsProtocol: %s}
`, hostOf(gws[0].Addr()), portOf(gws[0].Addr()), hostOf(gws[1].Addr()), portOf(gws[1].Addr()), fleetID, *listenAddr,
		free[1], envoy, free[3], bootstrap, argsJSON, *xdsProtocol)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgYAML), 0o644); err != nil {
		return nil, "", scrape{}, nil, err
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	logPath := filepath.Join(dir, "daemon.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	defer logFile.Close()
	envoyLog, err := os.Create(filepath.Join(dir, "envoy.log"))
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	defer envoyLog.Close()
	os.Stdout, os.Stderr = envoyLog, envoyLog // the daemon passes them on to Envoy
	defer func() { os.Stdout, os.Stderr = stdout, stderr }()

	d := daemon.New(cfg, slog.New(slog.NewTextHandler(logFile, nil)))
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- d.Run(dctx) }()
	m := &measurer{ctx: ctx, d: d, done: done, admin: fmt.Sprintf("127.0.0.1:%d", free[3]), httpPort: httpPort}
	watchCtx, stopWatch := context.WithCancel(ctx)
	go m.watchStreams(watchCtx)
	defer func() {
		stopWatch()
		cancel()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			err = errors.Join(err, errors.New("daemon did not stop within 60s"))
		}
		if err != nil {
			err = fmt.Errorf("%w\ndaemon log (last lines):\n%s\nenvoy log (last lines):\n%s", err, tail(logPath, 20), tail(envoyLog.Name(), 20))
		}
	}()

	progress := func(s step) {
		fmt.Fprintf(stderr, "  %-17s served=%.3fs cds=%.3fs lds=%.3fs ack=%.3fs http=%.3fs tcp=%.3fs envoy-cpu=%.1fs streams-lost=%d rss=%.0fMiB hwm=%.0fMiB daemon=%.0fMiB (warm %.1fs after the ACK; one /stats query %.2fs)\n",
			s.name, s.served, s.cds, s.lds, s.ack, s.httpOK, s.tcpOK, s.cpu, s.drops, s.rssMiB, s.hwmMiB, s.daemonRSS, s.settleFor, s.statsQuery)
		steps = append(steps, s)
	}
	s, err := m.envoyStart("start", 1, 0)
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	progress(s)
	if ads, err = adsFlavour(bootstrap); err != nil {
		return nil, "", scrape{}, nil, err
	}
	fmt.Fprintf(stderr, "  writing %d services\n", n)
	if s, err = m.change("large catalog", cat, n, n-1); err != nil { // service n-1 is new
		return nil, "", scrape{}, nil, err
	}
	progress(s)
	if s, err = m.change("one service added", cat, n+1, n); err != nil {
		return nil, "", scrape{}, nil, err
	}
	progress(s)
	// Envoy's bytes received are read once before and once after the changes: a /stats query
	// at this size holds Envoy's main thread, which also runs xDS, for seconds.
	rx0, err := m.xdsRxBytes()
	if err != nil {
		return nil, "", scrape{}, nil, err
	}
	stopScrapes := m.scrapeEvery(*scrapeEvery)
	for k := range *changes {
		c, err := m.oneChange(cat, n+1, k)
		if err != nil {
			return nil, "", scrape{}, nil, err
		}
		fmt.Fprintf(stderr, "  %s change %d: write -> served %.3fs, served -> ACK %.3fs\n", time.Now().Format("15:04:05.000"), k+1, c.served, c.ack)
		cs = append(cs, c)
	}
	if scrapes := stopScrapes(); *scrapeEvery > 0 {
		fmt.Fprintf(stderr, "  %d scrapes during the changes (every %s)\n", scrapes, *scrapeEvery)
	}
	if len(cs) > 0 {
		rx1, err := m.xdsRxBytes()
		if err != nil {
			return nil, "", scrape{}, nil, err
		}
		for i := range cs {
			cs[i].rxBytes = (rx1 - rx0) / float64(len(cs))
		}
	}
	if len(cs) > 0 {
		var acks, bytes []float64
		for _, c := range cs {
			acks, bytes = append(acks, c.ack), append(bytes, c.rxBytes)
		}
		fmt.Fprintf(stderr, "  %d one-service changes: served -> ACK p50 %.3fs p99 %.3fs; bytes to Envoy per change (mean) %.0f\n",
			len(cs), quantile(acks, 0.5), quantile(acks, 0.99), median(bytes))
	}
	if sc, err = m.scrape(); err != nil {
		return
	}
	fmt.Fprintf(stderr, "  one /stats/prometheus scrape (%s): %.1fs, %.0f MB, %.0f lines\n", scrapeDesc, sc.seconds, sc.bytes/1e6, sc.lines)
	if err := syscall.Kill(m.pid, syscall.SIGKILL); err != nil {
		return nil, "", scrape{}, nil, err
	}
	if s, err = m.envoyStart("envoy restart", n+1, m.pid); err != nil {
		return nil, "", scrape{}, nil, err
	}
	progress(s)
	return steps, ads, sc, cs, nil
}

// changeStat is one timed one-service change.
type changeStat struct {
	served, ack float64
	rxBytes     float64 // the mean over the run's changes
}

// oneChange changes one service's identity (new versions of its two clusters, nothing else) and
// times catalog write -> snapshot served -> Envoy's ACK.
func (m *measurer) oneChange(cat *catalogFile, n, k int) (changeStat, error) {
	deadline := time.Now().Add(*timeout)
	prev := m.d.XDS.Current().ConfigVersion
	svc := 1 + k%(n-2) // not the probed services
	if cat.identity == nil {
		cat.identity = map[int]string{}
	}
	cat.identity[svc] = fmt.Sprintf("spiffe://cluster.local/ns/bench/sa/changed-%d", k)
	written := time.Now()
	if err := cat.write(n); err != nil {
		return changeStat{}, err
	}
	for m.d.XDS.Current().ConfigVersion == prev {
		if err := m.check(deadline, "the changed snapshot"); err != nil {
			return changeStat{}, err
		}
		time.Sleep(time.Millisecond)
	}
	// The gauge is set just after the snapshot is swapped in: until it is, it holds the previous
	// snapshot's time, and timing from that would charge this change's reload to Envoy.
	var t0 time.Time
	for {
		served, err := m.gauge("fwdproxy_snapshot_last_update_timestamp_seconds")
		if err != nil {
			return changeStat{}, err
		}
		if t0 = time.Unix(0, int64(served*1e9)); t0.After(written) {
			break
		}
		if err := m.check(deadline, "the changed snapshot's update time"); err != nil {
			return changeStat{}, err
		}
		time.Sleep(time.Millisecond)
	}
	c := changeStat{served: t0.Sub(written).Seconds()}
	for {
		cur := m.d.XDS.Current()
		if m.d.XDS.Status().AckedCurrent > 0 && m.d.XDS.Current() == cur {
			c.ack = time.Since(t0).Seconds()
			break
		}
		if err := m.check(deadline, "envoy's ACK of the change"); err != nil {
			return c, err
		}
		time.Sleep(time.Millisecond)
	}
	return c, nil
}

// scrapeEvery scrapes Envoy every d (none when d is 0) until the returned function is called,
// which waits for the scrape in progress and returns how many were made.
func (m *measurer) scrapeEvery(d time.Duration) (stop func() int) {
	if d <= 0 {
		return func() int { return 0 }
	}
	done, finished := make(chan struct{}), make(chan int)
	go func() {
		n := 0
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			if _, err := m.scrape(); err != nil {
				fmt.Fprintln(stderr, "  scrape:", err)
			}
			n++
			select {
			case <-done:
				finished <- n
				return
			case <-t.C:
			}
		}
	}()
	return func() int { close(done); return <-finished }
}

// xdsRxBytes is what Envoy has received on its connections to the control plane.
func (m *measurer) xdsRxBytes() (float64, error) {
	ctx, cancel := context.WithTimeout(m.ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+m.admin+"/stats?filter=^cluster\\.xds_cluster\\.upstream_cx_rx_bytes_total$", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	_, v, ok := strings.Cut(strings.TrimSpace(string(b)), ": ")
	if !ok {
		return 0, fmt.Errorf("envoy admin /stats: no xds_cluster rx bytes in %q", b)
	}
	return strconv.ParseFloat(v, 64)
}

func quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Sorted(slices.Values(v))
	return s[min(len(s)-1, int(math.Ceil(q*float64(len(s))))-1)]
}

// scrape is one fetch of Envoy's Prometheus stats.
type scrape struct{ seconds, bytes, lines float64 }

// scrape fetches /stats/prometheus from Envoy's admin API, as Prometheus does from the
// stats-only listener of the machine image, and measures it.
func (m *measurer) scrape() (scrape, error) {
	ctx, cancel := context.WithTimeout(m.ctx, *timeout)
	defer cancel()
	t0 := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+m.admin+"/stats/prometheus?"+scrapeQuery, nil)
	if err != nil {
		return scrape{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return scrape{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return scrape{}, fmt.Errorf("envoy admin /stats/prometheus: %s", resp.Status)
	}
	var sc scrape
	buf := make([]byte, 1<<20)
	for {
		k, err := resp.Body.Read(buf)
		sc.bytes += float64(k)
		sc.lines += float64(bytes.Count(buf[:k], []byte{'\n'}))
		if err == io.EOF {
			break
		}
		if err != nil {
			return scrape{}, fmt.Errorf("envoy admin /stats/prometheus: %w", err)
		}
	}
	sc.seconds = time.Since(t0).Seconds()
	return sc, nil
}

// dropUpdates forgets Envoy's update times when the step lost a stream: they are those of the
// state re-sent on the new stream.
func (s *step) dropUpdates() {
	if s.drops > 0 {
		s.cds, s.lds = math.NaN(), math.NaN()
	}
}

// catalogFile writes the generated catalog atomically (the daemon watches the file).
type catalogFile struct {
	path     string
	httpPort int
	// identity overrides services' identities, by index (the one-service changes).
	identity map[int]string
}

func host(i int) string { return fmt.Sprintf("svc-%05d.ns-%03d.svc.cluster.local", i, i%100) }

func (c *catalogFile) write(n int) error {
	var b strings.Builder
	b.WriteString("services:\n")
	for i := range n {
		id := fmt.Sprintf("spiffe://cluster.local/ns/ns-%03d/sa/svc-%05d", i%100, i)
		if i == 0 || i >= *services-1 {
			id = probeID // the services probed, served by the sidecars
		}
		if changed, ok := c.identity[i]; ok {
			id = changed
		}
		fmt.Fprintf(&b, "  - host: %s\n    ports: [{number: %d, protocol: http}, {number: %d, protocol: tcp}]\n    identities: [%s]\n",
			host(i), c.httpPort, *tcpBase+i, id)
	}
	tmp := c.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, c.path)
}

// measurer takes the measurements of one run.
type measurer struct {
	ctx      context.Context
	d        *daemon.Daemon
	done     chan error
	admin    string // Envoy's admin address
	httpPort int
	pid      int          // the Envoy process
	lost     atomic.Int64 // xDS streams closed so far
}

// watchStreams counts xDS streams that close: the open count falling.
func (m *measurer) watchStreams(ctx context.Context) {
	prev := 0
	for ctx.Err() == nil {
		c := m.d.XDS.Status().Clients
		if c < prev {
			m.lost.Add(int64(prev - c))
			fmt.Fprintf(stderr, "  %s xDS stream closed\n", time.Now().Format("15:04:05.000"))
		}
		prev = c
		time.Sleep(5 * time.Millisecond)
	}
}

// envoyStart waits for an Envoy other than old to start and measures from its start.
func (m *measurer) envoyStart(name string, services, old int) (step, error) {
	deadline := time.Now().Add(*timeout)
	// The killed Envoy's stream must be gone before the new one's ACK is awaited (the daemon
	// waits a second before restarting Envoy).
	for old != 0 && m.d.XDS.Status().Clients > 0 {
		if err := m.check(deadline, "the killed envoy's xDS stream to close"); err != nil {
			return step{}, err
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // for watchStreams to count the killed Envoy's stream
	lost := m.lost.Load()
	for {
		if pid := envoyChild(); pid != 0 && pid != old {
			m.pid = pid
			break
		}
		if err := m.check(deadline, "envoy to start"); err != nil {
			return step{}, err
		}
		time.Sleep(2 * time.Millisecond)
	}
	t0 := time.Now()
	s := step{name: name, services: services, served: math.NaN()}
	if err := m.await(&s, t0, 0, services-1, deadline); err != nil {
		return s, err
	}
	err := m.settle(&s, t0, services, deadline)
	s.drops = int(m.lost.Load() - lost)
	s.dropUpdates()
	return s, err
}

// change writes a catalog of n services and measures from the snapshot being served.
func (m *measurer) change(name string, cat *catalogFile, n, probe int) (step, error) {
	deadline := time.Now().Add(*timeout)
	lost := m.lost.Load()
	prev := m.d.XDS.Current().ConfigVersion
	cpu0 := procstat.CPUSeconds(m.pid)
	written := time.Now()
	if err := cat.write(n); err != nil {
		return step{}, err
	}
	for m.d.XDS.Current().ConfigVersion == prev {
		if err := m.check(deadline, "the new snapshot"); err != nil {
			return step{}, err
		}
		time.Sleep(time.Millisecond)
	}
	served, err := m.gauge("fwdproxy_snapshot_last_update_timestamp_seconds")
	if err != nil {
		return step{}, err
	}
	t0 := time.Unix(0, int64(served*1e9))
	s := step{name: name, services: n, served: t0.Sub(written).Seconds()}
	if err := m.await(&s, t0, cpu0, probe, deadline); err != nil {
		return s, err
	}
	err = m.settle(&s, t0, n, deadline)
	s.drops = int(m.lost.Load() - lost)
	s.dropUpdates()
	return s, err
}

// await measures, from t0, the ACK of the current snapshot and the first good HTTP request and
// TCP connection to service probe, and Envoy's CPU seconds since cpu0 until then.
func (m *measurer) await(s *step, t0 time.Time, cpu0 float64, probe int, deadline time.Time) error {
	type result struct {
		kind string
		at   time.Time
	}
	ctx, cancel := context.WithDeadline(m.ctx, deadline)
	defer cancel()
	results := make(chan result, 2)
	go func() {
		at, _ := firstOK(ctx, func() error { return httpProbe(ctx, m.httpPort, host(probe)) })
		results <- result{"http", at}
	}()
	go func() {
		at, _ := firstOK(ctx, func() error { return tcpProbe(ctx, *tcpBase+probe) })
		results <- result{"tcp", at}
	}()
	for {
		cur := m.d.XDS.Current()
		if m.d.XDS.Status().AckedCurrent > 0 && m.d.XDS.Current() == cur {
			s.ack = time.Since(t0).Seconds()
			break
		}
		if err := m.check(deadline, "envoy's ACK"); err != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
	for range 2 {
		r := <-results
		if r.at.IsZero() {
			return fmt.Errorf("%s: no good %s answer from service %d through envoy within %s", s.name, r.kind, probe, *timeout)
		}
		if r.kind == "http" {
			s.httpOK = r.at.Sub(t0).Seconds()
		} else {
			s.tcpOK = r.at.Sub(t0).Seconds()
		}
	}
	s.cpu = procstat.CPUSeconds(m.pid) - cpu0
	return nil
}

// settle waits until Envoy warms nothing, checks it holds every listener and cluster and that
// no NACK was counted, and reads Envoy's update times and the memory figures.
func (m *measurer) settle(s *step, t0 time.Time, services int, deadline time.Time) error {
	acked := time.Now()
	for {
		q := time.Now()
		st, err := m.envoyStats()
		s.statsQuery = time.Since(q).Seconds()
		if err == nil && st["cluster_manager.warming_clusters"] == 0 && st["listener_manager.total_listeners_warming"] == 0 {
			s.settleFor = time.Since(acked).Seconds()
			// Clusters: two per service and the static xDS cluster. Listeners: a TCP one per
			// service and the shared HTTP one.
			s.clusters, s.listeners = st["cluster_manager.active_clusters"]-1, st["listener_manager.total_listeners_active"]
			if s.clusters != 2*services || s.listeners != services+1 {
				return fmt.Errorf("%s: envoy holds %d clusters and %d listeners, want %d and %d", s.name, s.clusters, s.listeners, 2*services, services+1)
			}
			at := func(k string) float64 {
				return time.UnixMilli(int64(st[k])).Sub(t0).Seconds()
			}
			s.cds, s.lds = at("cluster_manager.cds.update_time"), at("listener_manager.lds.update_time")
			break
		}
		if err := m.check(deadline, "envoy to finish warming"); err != nil {
			return err
		}
		time.Sleep(250 * time.Millisecond)
	}
	nacks, err := m.counterSum("fwdproxy_xds_nacks_total")
	if err != nil {
		return err
	}
	if nacks > 0 {
		return fmt.Errorf("%s: envoy rejected %v responses (fwdproxy_xds_nacks_total)", s.name, nacks)
	}
	if s.rssMiB, s.hwmMiB, err = procstat.MemMiB(m.pid); err != nil {
		return err
	}
	debug.FreeOSMemory() // the same measure in every run of this process
	s.daemonRSS, _, err = procstat.MemMiB(os.Getpid())
	return err
}

// check fails when the deadline passed, the program is interrupted or the daemon stopped.
func (m *measurer) check(deadline time.Time, what string) error {
	select {
	case err := <-m.done:
		m.done <- err
		return fmt.Errorf("daemon stopped while waiting for %s: %v", what, err)
	default:
	}
	if err := m.ctx.Err(); err != nil {
		return fmt.Errorf("waiting for %s: %w", what, err)
	}
	if time.Now().After(deadline) {
		return fmt.Errorf("no %s within %s", what, *timeout)
	}
	return nil
}

func (m *measurer) gauge(name string) (float64, error) {
	mfs, err := m.d.Registry.Gather()
	if err != nil {
		return 0, err
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue(), nil
		}
	}
	return 0, fmt.Errorf("no metric %s", name)
}

func (m *measurer) counterSum(name string) (float64, error) {
	mfs, err := m.d.Registry.Gather()
	if err != nil {
		return 0, err
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			sum := 0.0
			for _, x := range mf.GetMetric() {
				sum += x.GetCounter().GetValue()
			}
			return sum, nil
		}
	}
	return 0, fmt.Errorf("no metric %s", name)
}

// envoyStatNames are the server-wide stats read from Envoy's admin API.
var envoyStatNames = []string{
	"cluster_manager.active_clusters", "cluster_manager.warming_clusters", "cluster_manager.cds.update_time",
	"listener_manager.total_listeners_active", "listener_manager.total_listeners_warming", "listener_manager.lds.update_time",
}

// envoyStats reads envoyStatNames from Envoy's admin API.
func (m *measurer) envoyStats() (map[string]int, error) {
	ctx, cancel := context.WithTimeout(m.ctx, time.Minute)
	defer cancel()
	var re []string
	for _, n := range envoyStatNames {
		re = append(re, strings.ReplaceAll(n, ".", `\.`))
	}
	u := "http://" + m.admin + "/stats?filter=^(" + strings.Join(re, "|") + ")$"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("envoy admin /stats: %s", resp.Status)
	}
	st := map[string]int{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ": ")
		if n, err := strconv.Atoi(v); ok && err == nil {
			st[k] = n
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for _, n := range envoyStatNames {
		if _, ok := st[n]; !ok {
			return nil, fmt.Errorf("envoy admin /stats: no %s in %v", n, st)
		}
	}
	return st, nil
}

// firstOK calls probe every 10ms until it succeeds and returns when it did.
func firstOK(ctx context.Context, probe func() error) (time.Time, error) {
	for {
		if err := probe(); err == nil {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

var probeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}

func httpProbe(ctx context.Context, port int, host string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(*listenAddr, strconv.Itoa(port))+"/", nil)
	if err != nil {
		return err
	}
	req.Host = host
	resp, err := probeClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "service=probe-http") {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

func tcpProbe(ctx context.Context, port int) error {
	dialer := net.Dialer{Timeout: 2 * time.Second}
	c, err := dialer.DialContext(ctx, "tcp", net.JoinHostPort(*listenAddr, strconv.Itoa(port)))
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return err
	}
	_ = c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if !strings.HasSuffix(string(b), "ping\n") {
		return fmt.Errorf("got %q", b)
	}
	return nil
}

// envoyChild is the PID of this process's envoy child (the daemon's), or 0.
func envoyChild() int {
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, t := range tasks {
		b, _ := os.ReadFile(t)
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) == "envoy" {
				return pid
			}
		}
	}
	return 0
}

// adsFlavour reads the ADS API type from the bootstrap the daemon wrote.
func adsFlavour(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var bs struct { // the daemon writes proto field names
		DynamicResources struct {
			AdsConfig struct {
				APIType string `json:"api_type"`
			} `json:"ads_config"`
		} `json:"dynamic_resources"`
	}
	if err := json.Unmarshal(b, &bs); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	switch t := bs.DynamicResources.AdsConfig.APIType; t {
	case "GRPC":
		return "state of the world (the daemon's bootstrap: ads_config api_type GRPC)", nil
	case "DELTA_GRPC":
		return "delta (the daemon's bootstrap: ads_config api_type DELTA_GRPC)", nil
	default:
		return "", fmt.Errorf("%s: ads_config api_type %q", path, t)
	}
}

// raiseFileLimit raises RLIMIT_NOFILE to the machine image's 1048576 where allowed (Envoy, a
// child, inherits it), else the soft limit to the hard one, and returns the soft limit in force.
func raiseFileLimit() uint64 {
	var l syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l)
	if l.Cur < 1048576 {
		want := syscall.Rlimit{Cur: 1048576, Max: max(l.Max, 1048576)}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			fmt.Fprintf(stderr, "envoyscale: cannot raise the open-file limit to 1048576 (%v); Envoy gets the hard limit, %d\n", err, l.Max)
			want = syscall.Rlimit{Cur: l.Max, Max: l.Max}
			_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want)
		}
	}
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l)
	return l.Cur
}

// choosePorts checks that the service ports are free, or with -tcp-base 0 picks a free range.
func choosePorts(n int) error {
	if *tcpBase != 0 {
		return portsFree(*tcpBase, n)
	}
	var errs []error
	for base := 20000; base >= 10000; base -= 1000 {
		err := portsFree(base, n)
		if err == nil {
			*tcpBase = base
			return nil
		}
		errs = append(errs, err)
	}
	return fmt.Errorf("no free range of %d ports on %s; set -tcp-base: %w", n, *listenAddr, errors.Join(errs...))
}

// portsFree checks that n TCP ports from base are free on -listen.
func portsFree(base, n int) error {
	for p := base; p < base+n; p++ {
		l, err := net.Listen("tcp", net.JoinHostPort(*listenAddr, strconv.Itoa(p)))
		if err != nil {
			return fmt.Errorf("port %d (of %d..%d) is in use: %w", p, base, base+n-1, err)
		}
		l.Close()
	}
	return nil
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func hostOf(addr string) string { h, _, _ := net.SplitHostPort(addr); return h }
func portOf(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }

// envoyVersion shortens `envoy --version` (".../envoy  version: SHA/1.40.0/Clean/RELEASE/BoringSSL")
// to "Envoy 1.40.0".
func envoyVersion(v string) string {
	_, v, _ = strings.Cut(v, "version: ")
	if f := strings.Split(v, "/"); len(f) > 1 {
		return "Envoy " + f[1]
	}
	return "Envoy"
}

// median of the values that are numbers; NaN when none is.
func median(v []float64) float64 {
	v = slices.DeleteFunc(slices.Clone(v), math.IsNaN)
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func secs(v []float64) string {
	m := median(v)
	if math.IsNaN(m) {
		return "-"
	}
	return fmt.Sprintf("%.3f", m)
}

func num(v []float64) string { return fmt.Sprintf("%.0f", median(v)) }

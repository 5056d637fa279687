// Command fleetscale measures fleet-wide propagation: a change applied through one instance's
// admin API (as `fwdproxy apply` does) until every instance's data plane has acknowledged the
// xDS update that carries it, in a fleet of -instances instances serving -services services.
//
// What runs, and what is simulated:
//
//   - Each instance is a separate process running the real daemon (pkg/daemon, this program
//     re-executed): gossip over memberlist on 127.0.0.1 with an encrypted keyring and the
//     configured timing profile (-timing, production's lan by default), the fleet store, the
//     catalog pipeline (store sources -> merge -> translation -> validated snapshot) and the
//     xDS server on its Unix socket. dataplane: none, so nothing binds the services' ports.
//   - The first instance (fleet-00, the lowest name) leads and runs discovery: a catalog file of
//     -services services x 2 ports (a shared HTTP port and a TCP port each), which it writes into
//     the fleet store; the others receive it by gossip, as production instances do.
//   - Each instance's data plane is replaced by a minimal delta ADS client in this process (gRPC
//     on the instance's xDS socket, the node ID the daemon expects of its own data plane): it
//     subscribes to every cluster and listener (Envoy's wildcard CDS and LDS; routes and secrets
//     are not subscribed), ACKs every response and records when it ACKs the first response
//     carrying the change. It applies nothing: Envoy's own time to apply a one-service change is
//     bench/envoyscale's figure.
//
// The changes start once the fleet has converged (every member advertises the same store digest)
// and settled (-settle-cores: the instances' CPU over 3 s falls below it), so that they measure
// a fleet that has been up for a while rather than the start's collections and joins.
//
// Each change is an operator entry that overrides one discovered service with a new identity
// (its two clusters change), applied over the admin socket of a different instance each time.
// Changes run one after the other: the next starts once every instance ACKed the previous one.
// Reported, over the -changes changes: apply -> the last instance's ACK (the fleet-wide figure)
// as p50, p99 and max; the same per instance; per instance, apply -> its snapshot served
// (gossip, merge, translation, snapshot) and served -> ACK (xDS push); the instances' CPU per
// change; their memory (VmRSS, VmHWM); the gossip messages' sizes (the change's delta, computed
// with the store's wire format, and the push/pull state the instances exchanged).
//
// Every instance shares this machine's cores: a change costs all the instances' rebuilds on
// them, where a real fleet has cores per instance. The CPU per instance per change is reported
// so that can be told apart. And its memory: each instance runs with GOMEMLIMIT
// (-instance-memlimit, 300MiB by default) so that 32 instances at 10,000 services fit one
// machine; production instances have memory of their own and need no limit.
//
// Usage: go run ./bench/fleetscale [-instances 32] [-services 10000] [-changes 100] (make
// bench-fleet). Bounded: -timeout limits setup and each change.
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
	"maps"
	"math"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/internal/procstat"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

const (
	fleetID = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
	// instanceEnv, set to a config path, makes this program run one instance (the daemon).
	instanceEnv = "FWDPROXY_FLEETSCALE_INSTANCE"
	// tcpBase is the first service TCP port: above FreePort's range, so no config port collides.
	tcpBase  = 40000
	httpPort = 8080
)

// options are the benchmark's parameters (flags in main, fixed in the smoke test).
type options struct {
	instances, services, changes int
	timing                       string
	timeout                      time.Duration
	startBatch                   int
	profile                      int // instance to profile during the changes, -1 for none
	memLimit                     string
	minFreeMiB                   int
	settleCores                  float64
	keep                         bool
	out, progress                io.Writer
}

func main() {
	if cfg := os.Getenv(instanceEnv); cfg != "" {
		os.Exit(runInstance(cfg))
	}
	var o options
	flag.IntVar(&o.instances, "instances", 32, "fleet instances (processes)")
	flag.IntVar(&o.services, "services", 10000, "services in the leader's discovered catalog (each with a shared HTTP port and a TCP port of its own)")
	flag.IntVar(&o.changes, "changes", 100, "changes, applied one after the other")
	flag.StringVar(&o.timing, "timing", "lan", "peers.timing of every instance: lan (production's default), wan or local")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Minute, "limit for the fleet's start and for each change")
	flag.IntVar(&o.startBatch, "start-batch", 4, "instances started at once after the leader (bounds the memory of concurrent first builds)")
	flag.IntVar(&o.profile, "profile", -1, "instance whose CPU profile of the changes is written to its work directory (cpu.pprof; implies -keep)")
	flag.StringVar(&o.memLimit, "instance-memlimit", "300MiB", "GOMEMLIMIT of each instance, so that 32 instances at 10,000 services fit a shared machine (empty: none, as in production, where each instance has its own memory)")
	flag.Float64Var(&o.settleCores, "settle-cores", 0.2, "before the first change, wait (up to -timeout) until the instances together use less than this many cores over 3 s: the changes measure a settled fleet, not the start's collections and joins (0: no wait)")
	flag.IntVar(&o.minFreeMiB, "min-free", 1536, "stop when the machine's available memory (MemAvailable) falls below this many MiB")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (configs, catalog, instance logs)")
	flag.Parse()
	if o.profile >= 0 {
		o.keep = true
	}
	o.out, o.progress = os.Stdout, os.Stderr
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "fleetscale:", err)
		os.Exit(1)
	}
}

// runInstance is one fleet instance: the daemon with the given config, until SIGTERM.
func runInstance(path string) int {
	cfg, err := config.Load(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	go profileOnSignal(filepath.Join(filepath.Dir(path), "cpu.pprof"))
	if err := daemon.New(cfg, log).Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "daemon:", err)
		return 1
	}
	return 0
}

// profileOnSignal writes a CPU profile to path between SIGUSR1 and SIGUSR2 (-profile), and heap
// profiles beside it at SIGUSR1 (heap-before.pprof) and SIGUSR2 (heap.pprof). At SIGWINCH it collects garbage, returns the
// free memory to the system and then creates the file freed beside path: the instance's RSS is
// then what it holds (the parent's "RSS after GC").
func profileOnSignal(path string) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	var f *os.File
	for s := range sig {
		switch {
		case s == syscall.SIGWINCH:
			debug.FreeOSMemory()
			if err := os.WriteFile(filepath.Join(filepath.Dir(path), "freed"), nil, 0o644); err != nil {
				fmt.Fprintln(os.Stderr, "freed:", err)
			}
		case s == syscall.SIGUSR1 && f == nil:
			// The heap before the changes too: pprof -base gives what they allocated. (A heap
			// profile is as of the last collection: collect first.)
			runtime.GC()
			if h, err := os.Create(filepath.Join(filepath.Dir(path), "heap-before.pprof")); err == nil {
				_ = pprof.Lookup("heap").WriteTo(h, 0)
				h.Close()
			}
			var err error
			if f, err = os.Create(path); err == nil {
				err = pprof.StartCPUProfile(f)
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "cpu profile:", err)
			}
		case s == syscall.SIGUSR2 && f != nil:
			pprof.StopCPUProfile()
			f.Close()
			f = nil
			// And what the instance holds after the changes (live heap, after a collection).
			runtime.GC()
			if h, err := os.Create(filepath.Join(filepath.Dir(path), "heap.pprof")); err == nil {
				_ = pprof.Lookup("heap").WriteTo(h, 0)
				h.Close()
			}
		}
	}
}

// rssAfterGC has the instance collect garbage and return free memory, and reads its RSS and
// peak RSS then.
func rssAfterGC(in *instance, timeout time.Duration) (rss, hwm float64, err error) {
	marker := filepath.Join(in.dir, "freed")
	_ = os.Remove(marker)
	if err := in.cmd.Process.Signal(syscall.SIGWINCH); err != nil {
		return 0, 0, err
	}
	for deadline := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return 0, 0, fmt.Errorf("%s: no collection within %s", in.name, timeout)
		}
	}
	return procstat.MemMiB(in.cmd.Process.Pid)
}

// result is what run measured (the smoke test checks it).
type result struct {
	fleet    []float64          // per change: apply -> the last instance's ACK, seconds
	perInst  [][]float64        // per change, per instance: apply -> ACK
	served   [][]float64        // per change, per instance: apply -> snapshot served
	cpu      []float64          // per instance: CPU seconds per change
	rss, hwm []float64          // per instance, MiB
	rssGC    []float64          // per instance, MiB, after a collection that returned free memory
	sent     map[string]float64 // xDS resources sent per change and instance, by type
	delta    int                // the change's gossip delta message, bytes
	state    float64            // mean push/pull state message, bytes
	lost     int64              // xDS streams lost
	settled  float64            // seconds from convergence until the fleet settled
	idle     float64            // cores the settled fleet used, all instances together
}

// instance is one running fleet member and its stand-in data plane.
type instance struct {
	name, dir   string
	gossip      int
	metricsAddr string
	cmd         *exec.Cmd
	exited      chan error
	dp          *ackClient
	admin       *admin.Client
}

func hostName(i int) string { return fmt.Sprintf("svc-%05d.ns-%03d.svc.cluster.local", i, i%100) }

func serviceYAML(b *strings.Builder, i int, id string) {
	fmt.Fprintf(b, "  - host: %s\n    ports: [{number: %d, protocol: http}, {number: %d, protocol: tcp}]\n    identities: [%s]\n",
		hostName(i), httpPort, tcpBase+i, id)
}

func run(ctx context.Context, o options) (*result, error) {
	if o.instances < 2 || o.services < 2 || o.services > 65535-tcpBase || o.changes < 1 {
		return nil, fmt.Errorf("-instances %d -services %d -changes %d: need 2 or more instances, 2..%d services and a change", o.instances, o.services, o.changes, 65535-tcpBase)
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "fleetscale-")
	if err != nil {
		return nil, err
	}
	if o.keep {
		fmt.Fprintln(o.progress, "work directory:", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	ca, err := meshtest.NewCA("cluster.local")
	if err != nil {
		return nil, err
	}
	leaf, err := ca.IssueFor(fleetID, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	certs := filepath.Join(dir, "certs")
	if err := os.Mkdir(certs, 0o700); err != nil {
		return nil, err
	}
	if _, _, _, err := leaf.WriteFiles(certs, ca.RootPEM); err != nil {
		return nil, err
	}
	keyring := filepath.Join(dir, "gossip.keys")
	if err := os.WriteFile(keyring, []byte(peers.GenerateKey()+"\n"), 0o600); err != nil {
		return nil, err
	}
	var cat strings.Builder
	cat.WriteString("services:\n")
	for i := range o.services {
		serviceYAML(&cat, i, fmt.Sprintf("spiffe://cluster.local/ns/ns-%03d/sa/svc-%05d", i%100, i))
	}
	catalogPath := filepath.Join(dir, "catalog.yaml")
	if err := os.WriteFile(catalogPath, []byte(cat.String()), 0o644); err != nil {
		return nil, err
	}
	gwPort, err := meshtest.FreePort()
	if err != nil {
		return nil, err
	}

	insts := make([]*instance, o.instances)
	for i := range insts {
		in := &instance{name: fmt.Sprintf("fleet-%02d", i), exited: make(chan error, 1)}
		in.dir = filepath.Join(dir, in.name)
		if err := os.Mkdir(in.dir, 0o700); err != nil {
			return nil, err
		}
		mp, err := meshtest.FreePort()
		if err != nil {
			return nil, err
		}
		if in.gossip, err = meshtest.FreePort(); err != nil {
			return nil, err
		}
		in.metricsAddr = fmt.Sprintf("127.0.0.1:%d", mp)
		insts[i] = in
	}
	// fleet-00 starts the fleet alone (no seeds: with seeds it waits to reach one); the others
	// join it.
	for i, in := range insts {
		seeds := fmt.Sprintf("127.0.0.1:%d", insts[0].gossip)
		if i == 0 {
			seeds = ""
		}
		cfg := fmt.Sprintf(`node: {id: %s}
gateways: [{name: eastwest, address: 127.0.0.1, port: %d}]
identity:
  spiffeID: %s
  files: {certChain: %s/cert-chain.pem, privateKey: %s/key.pem, roots: %s/root-cert.pem}
discovery: {files: [%s]}
listen: {address: 127.0.0.1, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: %s}
admin: {socket: admin.sock}
dataplane: none
peers:
  bind: 127.0.0.1:%d
  seeds: [%s]
  keyring: %s
  timing: %s
`, in.name, gwPort, fleetID, certs, certs, certs, catalogPath, in.metricsAddr, in.gossip, seeds, keyring, o.timing)
		if err := os.WriteFile(filepath.Join(in.dir, "config.yaml"), []byte(cfg), 0o644); err != nil {
			return nil, err
		}
		in.admin = &admin.Client{Socket: filepath.Join(in.dir, "admin.sock")}
	}

	defer func() {
		for _, in := range insts {
			if in.dp != nil {
				in.dp.close()
			}
			if in.cmd != nil && in.cmd.Process != nil {
				_ = in.cmd.Process.Signal(syscall.SIGTERM)
			}
		}
		for _, in := range insts {
			if in.cmd == nil {
				continue
			}
			select {
			case <-in.exited:
			case <-time.After(20 * time.Second):
				_ = in.cmd.Process.Kill()
				<-in.exited
			}
		}
	}()
	start := func(in *instance) error {
		logf, err := os.Create(filepath.Join(in.dir, "daemon.log"))
		if err != nil {
			return err
		}
		in.cmd = exec.Command(self)
		in.cmd.Dir = in.dir
		in.cmd.Env = append(os.Environ(), instanceEnv+"="+filepath.Join(in.dir, "config.yaml"))
		if o.memLimit != "" {
			in.cmd.Env = append(in.cmd.Env, "GOMEMLIMIT="+o.memLimit)
		}
		in.cmd.Stdout, in.cmd.Stderr = logf, logf
		if err := in.cmd.Start(); err != nil {
			logf.Close()
			return err
		}
		go func() { in.exited <- in.cmd.Wait(); logf.Close() }()
		in.dp = newACKClient(in.name, filepath.Join(in.dir, "xds.sock"))
		go in.dp.run()
		return nil
	}
	// wantClusters: two per discovered service, until the changes start.
	wantClusters := 2 * o.services
	await := func(batch []*instance) error {
		deadline := time.Now().Add(o.timeout)
		for _, in := range batch {
			for in.dp.clusterCount() != wantClusters {
				select {
				case err := <-in.exited:
					in.exited <- err
					return fmt.Errorf("%s exited (%v):\n%s", in.name, err, tail(filepath.Join(in.dir, "daemon.log"), 20))
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(20 * time.Millisecond):
				}
				if err := memoryLeft(o.minFreeMiB); err != nil {
					return err
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("%s: its data plane holds %d clusters, not %d, after %s:\n%s", in.name, in.dp.clusterCount(), wantClusters, o.timeout, tail(filepath.Join(in.dir, "daemon.log"), 20))
				}
			}
		}
		return nil
	}
	t0 := time.Now()
	fmt.Fprintf(o.progress, "starting %d instances (%s timing), %d services\n", o.instances, o.timing, o.services)
	for i := 0; i < len(insts); {
		n := o.startBatch
		if i == 0 {
			n = 1 // the leader first: it discovers the catalog the others receive
		}
		batch := insts[i:min(i+n, len(insts))]
		for _, in := range batch {
			if err := start(in); err != nil {
				return nil, err
			}
		}
		if err := await(batch); err != nil {
			return nil, err
		}
		i += len(batch)
		fmt.Fprintf(o.progress, "  %d instances serving the catalog to their data planes (%.0fs)\n", i, time.Since(t0).Seconds())
	}
	// Wait until the fleet converged (every member advertises the same store digest), so the
	// changes do not race the start's anti-entropy.
	deadline := time.Now().Add(o.timeout)
	for {
		st, err := insts[0].admin.Status(ctx)
		if err == nil && st.Converged && len(st.Members) == o.instances {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("fleet not converged after %s (last status error %v)", o.timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Then until it settled: after its start, each instance still collects the garbage of its
	// first build and joins' push/pull exchanges run. A change in production meets a fleet that
	// has been up for a while. The last 3 s window is the instances' idle CPU.
	lost0 := lostStreams(insts)
	settleStart := time.Now()
	var settled, idle float64
	var idleCPU []float64
	var idleSecs float64
	for {
		idleCPU0, idleAt := cpuAll(insts), time.Now()
		time.Sleep(3 * time.Second)
		idleCPU = sub(cpuAll(insts), idleCPU0)
		idleSecs = time.Since(idleAt).Seconds()
		cores := sum(idleCPU) / idleSecs
		if o.settleCores <= 0 || cores < o.settleCores {
			settled, idle = time.Since(settleStart).Seconds(), cores
			fmt.Fprintf(o.progress, "  fleet settled after %.0fs: the instances use %.3f cores together\n", settled, idle)
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("fleet not settled in time (-timeout %s): the instances still use %.2f cores together (-settle-cores %g)", o.timeout, cores, o.settleCores)
		}
	}

	res := &result{settled: settled, idle: idle}
	if o.profile >= 0 && o.profile < len(insts) {
		p := insts[o.profile]
		_ = p.cmd.Process.Signal(syscall.SIGUSR1)
		defer fmt.Fprintln(o.progress, "CPU profile of the changes on", p.name+":", filepath.Join(p.dir, "cpu.pprof"), "(heap after them: heap.pprof; what they allocated: go tool pprof -sample_index=alloc_space -base heap-before.pprof heap.pprof)")
		defer func() { _ = p.cmd.Process.Signal(syscall.SIGUSR2); time.Sleep(time.Second) }()
	}
	sent0, err := sentAll(ctx, insts)
	if err != nil {
		return nil, err
	}
	cpu0 := cpuAll(insts)
	changesStart := time.Now()
	var deltaBytes int
	for k := range o.changes {
		svc := 1 + (k*7919)%(o.services-1)
		marker := fmt.Sprintf("change-%06d", k)
		var doc strings.Builder
		doc.WriteString("services:\n")
		serviceYAML(&doc, svc, "spiffe://cluster.local/ns/bench/sa/"+marker)
		writer := insts[(k*7+3)%len(insts)]
		for _, in := range insts {
			in.dp.expect(hostName(svc), marker)
		}
		applied := time.Now()
		if _, changed, err := writer.admin.Apply(ctx, "change.yaml", []byte(doc.String())); err != nil || changed != 1 {
			return nil, fmt.Errorf("change %d on %s: applied %d, %v", k, writer.name, changed, err)
		}
		if err := memoryLeft(o.minFreeMiB); err != nil {
			return nil, err
		}
		acks := make([]float64, len(insts))
		served := make([]float64, len(insts))
		for i, in := range insts {
			at, err := in.dp.wait(ctx, o.timeout)
			if err != nil {
				return nil, fmt.Errorf("change %d (written on %s): %s: %w", k, writer.name, in.name, err)
			}
			acks[i] = at.Sub(applied).Seconds()
		}
		for i, in := range insts {
			// The server sets the gauge after handing the snapshot to its streams: the ACK may
			// come first, so wait for the gauge to move past the apply.
			for {
				s, err := gauge(ctx, in.metricsAddr, "fwdproxy_snapshot_last_update_timestamp_seconds")
				if err != nil {
					return nil, fmt.Errorf("%s: %w", in.name, err)
				}
				if served[i] = time.Unix(0, int64(s*1e9)).Sub(applied).Seconds(); served[i] > 0 {
					break
				}
				if time.Since(applied) > o.timeout {
					return nil, fmt.Errorf("change %d: %s: snapshot not served within %s", k, in.name, o.timeout)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		res.perInst, res.served = append(res.perInst, acks), append(res.served, served)
		res.fleet = append(res.fleet, slices.Max(acks))
		if k == 0 {
			if deltaBytes, err = deltaSize(writer.name, doc.String()); err != nil {
				return nil, err
			}
		}
		last := slices.Index(acks, res.fleet[k])
		fmt.Fprintf(o.progress, "  change %d/%d (%s, written on %s): last ACK after %.3fs, on %s (served after %.3fs)\n",
			k+1, o.changes, hostName(svc), writer.name, res.fleet[k], insts[last].name, served[last])
	}
	elapsed := time.Since(changesStart).Seconds()
	cpu := sub(cpuAll(insts), cpu0)
	for i := range cpu {
		// Less the idle rate (gossip, probes) over the same span.
		res.cpu = append(res.cpu, (cpu[i]-idleCPU[i]/idleSecs*elapsed)/float64(o.changes))
	}
	for _, in := range insts {
		rss, hwm, err := procstat.MemMiB(in.cmd.Process.Pid)
		if err != nil {
			return nil, err
		}
		res.rss, res.hwm = append(res.rss, rss), append(res.hwm, hwm)
	}
	sent, err := sentAll(ctx, insts)
	if err != nil {
		return nil, err
	}
	res.sent = map[string]float64{}
	for typ, n := range sent {
		res.sent[typ] = (n - sent0[typ]) / float64(len(insts)*o.changes)
	}
	for i, in := range insts {
		rss, hwm, err := rssAfterGC(in, o.timeout)
		if err != nil {
			return nil, err
		}
		res.rssGC = append(res.rssGC, rss)
		// The peak read with it too: the RSS may have grown since the first reading (the
		// scrapes), and a release does not always leave the kernel's high-water mark above it.
		res.hwm[i] = max(res.hwm[i], hwm)
	}
	var stSum, stCount float64
	for _, in := range insts {
		s, c, err := histogram(ctx, in.metricsAddr, "fwdproxy_gossip_state_bytes")
		if err != nil {
			return nil, fmt.Errorf("%s: %w", in.name, err)
		}
		stSum, stCount = stSum+s, stCount+c
	}
	if stCount > 0 {
		res.state = stSum / stCount
	}
	res.delta = deltaBytes
	res.lost = lostStreams(insts) - lost0
	var rx float64
	for _, in := range insts {
		rx += float64(in.dp.rxChange.Load())
	}
	report(o, res, rx/float64(len(insts)*o.changes))
	return res, nil
}

func report(o options, r *result, rxPerChange float64) {
	var all, served, push []float64
	for k := range r.perInst {
		for i := range r.perInst[k] {
			all = append(all, r.perInst[k][i])
			served = append(served, r.served[k][i])
			push = append(push, r.perInst[k][i]-r.served[k][i])
		}
	}
	la, _ := os.ReadFile("/proc/loadavg")
	w := o.out
	limit := o.memLimit
	if limit == "" {
		limit = "none"
	}
	fmt.Fprintf(w, "\nFleet-wide propagation: %d instances (processes, %s gossip timing, encrypted, GOMEMLIMIT %s), %d services x 2 ports, %d changes one after the other; %d cores; load average before the report %s\n\n",
		o.instances, o.timing, limit, o.services, len(r.fleet), runtime.NumCPU(), strings.Join(strings.Fields(string(la))[:3], " "))
	fmt.Fprintln(w, "| measure | p50 | p99 | max |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	row := func(name string, v []float64, unit string, scale float64) {
		fmt.Fprintf(w, "| %s | %.3f%s | %.3f%s | %.3f%s |\n", name, quantile(v, 0.5)*scale, unit, quantile(v, 0.99)*scale, unit, slices.Max(v)*scale, unit)
	}
	row("apply -> every instance's data plane ACKed (per change)", r.fleet, " s", 1)
	row("apply -> one instance's ACK (per change and instance)", all, " s", 1)
	row("apply -> that instance's snapshot served (gossip, merge, translation, snapshot)", served, " s", 1)
	row("served -> that instance's ACK (xDS push; the server records served after handing the snapshot to its streams, so it can be below 0)", push, " s", 1)
	row("instance CPU per change (less idle)", r.cpu, " s", 1)
	row("instance RSS after the changes", r.rss, " MiB", 1)
	row("instance RSS after the changes and a GC returning free memory (what it holds)", r.rssGC, " MiB", 1)
	row("instance peak RSS", r.hwm, " MiB", 1)
	fmt.Fprintf(w, "\nGossip: the change's delta message %d bytes (one entry, the store's wire format, before memberlist's framing and encryption; "+
		"sent as a broadcast when it fits a packet); push/pull state message %.0f bytes on average (the whole store, exchanged on join and every push/pull interval). "+
		"xDS bytes to each data plane per change (delta responses, mean): %.0f. xDS streams lost during the changes: %d.\n",
		r.delta, r.state, rxPerChange, r.lost)
	var sent []string
	for _, typ := range slices.Sorted(maps.Keys(r.sent)) {
		sent = append(sent, fmt.Sprintf("%s %.1f", typ, r.sent[typ]))
	}
	fmt.Fprintf(w, "xDS resources each instance sent per change (fwdproxy_xds_resources_sent_total, by type): %s.\n", strings.Join(sent, ", "))
	cpuSum := sum(r.cpu)
	fmt.Fprintf(w, "Simulated: each data plane is a delta ADS client (wildcard CDS and LDS) that ACKs every response; it applies nothing. "+
		"All %d instances share this machine's %d cores, so each change costs %d rebuilds on them: %.2f s of CPU per change in all, "+
		"at least %.2f s of wall time on %d cores before any other load, where instances with cores of their own each spend their own %.3f s (median) in parallel.\n",
		o.instances, runtime.NumCPU(), o.instances, cpuSum, cpuSum/float64(runtime.NumCPU()), runtime.NumCPU(), quantile(r.cpu, 0.5))
	fmt.Fprintf(w, "The changes started once the fleet had converged and settled (%.0f s after converging, at %.3f cores for all instances together; -settle-cores %g).\n",
		r.settled, r.idle, o.settleCores)
}

// deltaSize is the gossip delta message carrying the operator entry: the entry as the store
// records it (validated, normalized) in the store's wire format (a version byte, a type byte and
// the JSON body pkg/peers encodes), before memberlist's framing and encryption.
func deltaSize(node, doc string) (int, error) {
	c, err := catalog.Parse("change.yaml", []byte(doc), catalog.Options{})
	if err != nil {
		return 0, err
	}
	st := peers.NewStore(node, peers.CatalogValidator(catalog.Options{}), peers.StoreOptions{})
	v, err := json.Marshal(c.Services[0])
	if err != nil {
		return 0, err
	}
	e, _, err := st.Put(peers.OperatorKey(c.Services[0].Host), v)
	if err != nil {
		return 0, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(struct {
		Entries []peers.Entry `json:"e"`
	}{[]peers.Entry{e}}); err != nil {
		return 0, err
	}
	return 2 + buf.Len(), nil
}

// --- the stand-in data plane -------------------------------------------------------------------

// ackClient is a minimal delta ADS client in place of an instance's data plane: it subscribes
// to every cluster and listener, ACKs each response, and records when it ACKed the first response
// carrying the awaited change (a cluster of the changed host with the new identity).
type ackClient struct {
	node, socket string
	ctx          context.Context
	cancel       context.CancelFunc

	mu       sync.Mutex
	clusters map[string]bool
	host     string // awaited: a cluster of host whose bytes contain marker
	marker   string
	acked    chan time.Time
	streams  atomic.Int64 // streams opened
	rxChange atomic.Int64 // response bytes while a change is awaited
}

func newACKClient(node, socket string) *ackClient {
	ctx, cancel := context.WithCancel(context.Background())
	return &ackClient{node: node, socket: socket, ctx: ctx, cancel: cancel, clusters: map[string]bool{}, acked: make(chan time.Time, 1)}
}

func (c *ackClient) close() { c.cancel() }

func (c *ackClient) clusterCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.clusters)
}

func (c *ackClient) expect(host, marker string) {
	c.mu.Lock()
	c.host, c.marker = host, marker
	c.mu.Unlock()
}

func (c *ackClient) wait(ctx context.Context, timeout time.Duration) (time.Time, error) {
	select {
	case t := <-c.acked:
		return t, nil
	case <-ctx.Done():
		return time.Time{}, ctx.Err()
	case <-time.After(timeout):
		return time.Time{}, fmt.Errorf("no ACK of the change within %s", timeout)
	}
}

// run keeps a stream open until close (the instance may not be listening yet at first).
func (c *ackClient) run() {
	conn, err := grpc.NewClient("unix://"+c.socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))
	if err != nil {
		return
	}
	defer conn.Close()
	client := discoverypb.NewAggregatedDiscoveryServiceClient(conn)
	for c.ctx.Err() == nil {
		// session returns only when the stream breaks (never nil): reconnect after a pause.
		if c.session(client); c.ctx.Err() == nil {
			select {
			case <-c.ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

func (c *ackClient) session(client discoverypb.AggregatedDiscoveryServiceClient) error {
	stream, err := client.DeltaAggregatedResources(c.ctx)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.clusters = map[string]bool{} // a new stream sends the whole state again
	c.mu.Unlock()
	node := &core.Node{Id: c.node, UserAgentName: "fleetscale-ack-client"}
	for _, t := range []string{resource.ClusterType, resource.ListenerType} {
		if err := stream.Send(&discoverypb.DeltaDiscoveryRequest{Node: node, TypeUrl: t, ResourceNamesSubscribe: []string{"*"}}); err != nil {
			return err
		}
		node = nil
	}
	first := true
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		if first {
			c.streams.Add(1)
			first = false
		}
		found := false
		if resp.GetTypeUrl() == resource.ClusterType {
			c.mu.Lock()
			for _, r := range resp.GetResources() {
				c.clusters[r.GetName()] = true
				if c.host != "" && strings.HasSuffix(r.GetName(), "|"+c.host) && bytes.Contains(r.GetResource().GetValue(), []byte(c.marker)) {
					found = true
				}
			}
			for _, n := range resp.GetRemovedResources() {
				delete(c.clusters, n)
			}
			if c.host != "" {
				c.rxChange.Add(int64(proto.Size(resp)))
			}
			if found {
				c.host = ""
			}
			c.mu.Unlock()
		} else if c.awaiting() {
			c.rxChange.Add(int64(proto.Size(resp)))
		}
		if err := stream.Send(&discoverypb.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			return err
		}
		if found {
			c.acked <- time.Now()
		}
	}
}

func (c *ackClient) awaiting() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.host != ""
}

func lostStreams(insts []*instance) int64 {
	var n int64
	for _, in := range insts {
		if in.dp != nil {
			n += max(0, in.dp.streams.Load()-1)
		}
	}
	return n
}

// memoryLeft fails when the machine's available memory is below minMiB: the fleet shares it.
func memoryLeft(minMiB int) error {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil || minMiB <= 0 {
		return nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, _ := strconv.Atoi(f[1])
			if kb/1024 < minMiB {
				return fmt.Errorf("the machine has %d MiB of memory available, under -min-free %d: stopping (fewer instances or services, or -instance-memlimit)", kb/1024, minMiB)
			}
		}
	}
	return nil
}

// --- process and metrics readings --------------------------------------------------------------

func cpuAll(insts []*instance) []float64 {
	out := make([]float64, len(insts))
	for i, in := range insts {
		out[i] = procstat.CPUSeconds(in.cmd.Process.Pid)
	}
	return out
}

func sub(a, b []float64) []float64 {
	out := make([]float64, len(a))
	for i := range a {
		out[i] = a[i] - b[i]
	}
	return out
}

// metricLines fetches an instance's /metrics and returns the lines of name (with suffixes).
func metricLines(ctx context.Context, addr, name string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), name) {
			out = append(out, sc.Text())
		}
	}
	return out, sc.Err()
}

func gauge(ctx context.Context, addr, name string) (float64, error) {
	lines, err := metricLines(ctx, addr, name+" ")
	if err != nil {
		return 0, err
	}
	if len(lines) != 1 {
		return 0, fmt.Errorf("metric %s: %d lines", name, len(lines))
	}
	return strconv.ParseFloat(strings.Fields(lines[0])[1], 64)
}

// sentAll sums every instance's fwdproxy_xds_resources_sent_total by type.
func sentAll(ctx context.Context, insts []*instance) (map[string]float64, error) {
	all := map[string]float64{}
	for _, in := range insts {
		c, err := counters(ctx, in.metricsAddr, "fwdproxy_xds_resources_sent_total", "type")
		if err != nil {
			return nil, fmt.Errorf("%s: %w", in.name, err)
		}
		for typ, n := range c {
			all[typ] += n
		}
	}
	return all, nil
}

// counters sums a counter's series by the value of one label.
func counters(ctx context.Context, addr, name, label string) (map[string]float64, error) {
	lines, err := metricLines(ctx, addr, name+"{")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, l := range lines {
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %q: %w", name, l, err)
		}
		key := ""
		if _, rest, ok := strings.Cut(f[0], label+`="`); ok {
			key, _, _ = strings.Cut(rest, `"`)
		}
		out[key] += v
	}
	return out, nil
}

func histogram(ctx context.Context, addr, name string) (sum, count float64, err error) {
	lines, err := metricLines(ctx, addr, name+"_")
	if err != nil {
		return 0, 0, err
	}
	var errs []error
	for _, l := range lines {
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		errs = append(errs, err)
		switch {
		case strings.HasPrefix(l, name+"_sum"):
			sum = v
		case strings.HasPrefix(l, name+"_count"):
			count = v
		}
	}
	return sum, count, errors.Join(errs...)
}

func quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Sorted(slices.Values(v))
	return s[min(len(s)-1, max(0, int(math.Ceil(q*float64(len(s))))-1))]
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func sum(xs []float64) float64 {
	var t float64
	for _, x := range xs {
		t += x
	}
	return t
}

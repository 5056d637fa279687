//go:build linux

// Package fleet_test runs the fleet as operators do: three fwdproxy instances, each on its own
// host (a network namespace with its own address), gossiping with encryption, behind a load
// balancer that behaves like the AWS NLB deploy/asg creates (HAProxy in TCP mode, health checks
// on /ready at the Terraform's interval and thresholds, deregistration with a drain delay), in
// front of the mesh stand-ins, with legacy VM clients on another host resolving mesh names to the
// load balancer. Each scenario runs under steady HTTP and TCP load and reports requests sent,
// failed, and the time to recover.
package fleet_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

var fwdproxyBin string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	var missing []string
	for _, tool := range []string{"ip", "haproxy"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "test/fleet needs %s: run scripts/test-deps (Debian packages iproute2 haproxy)\n", strings.Join(missing, ", "))
		return 1
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "test/fleet creates network namespaces: run it as root (CI does)")
		return 1
	}
	removeLeftovers()
	dir, err := os.MkdirTemp("", "fwdproxy-fleet-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	fwdproxyBin = filepath.Join(dir, "fwdproxy")
	build := exec.Command("go", "build", "-o", fwdproxyBin, "./cmd/fwdproxy")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build fwdproxy: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// timeScale divides the NLB's times from deploy/asg (health-check interval and timeout,
// deregistration delay) so the suite stays short; thresholds are kept as configured. Figures
// in the report are measured at this scale; multiply NLB-bound ones by it for production.
const timeScale = 10

// nlbTimings are deploy/asg's health check and deregistration delay.
type nlbTimings struct {
	Interval, Timeout  time.Duration
	Healthy, Unhealthy int
	Deregistration     time.Duration
	// Port is metrics_port: the daemon's /ready (the health check) and /metrics.
	Port int
}

// metricsPort is deploy/asg's metrics_port, set by newFleet.
var metricsPort int

// asgTimings reads the defaults of the health_check and deregistration_delay variables from
// deploy/asg/variables.tf, so the stand-in NLB checks as the real one does.
func asgTimings(t testing.TB) (real, scaled nlbTimings) {
	t.Helper()
	b, err := os.ReadFile("../../deploy/asg/variables.tf")
	if err != nil {
		t.Fatal(err)
	}
	num := func(re string) int {
		m := regexp.MustCompile(re).FindSubmatch(b)
		if m == nil {
			t.Fatalf("deploy/asg/variables.tf: no match for %s; update asgTimings to the variable's new shape", re)
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	real = nlbTimings{
		Interval:       time.Duration(num(`interval_seconds\s*=\s*optional\(number,\s*(\d+)\)`)) * time.Second,
		Timeout:        time.Duration(num(`timeout_seconds\s*=\s*optional\(number,\s*(\d+)\)`)) * time.Second,
		Healthy:        num(`healthy_threshold\s*=\s*optional\(number,\s*(\d+)\)`),
		Unhealthy:      num(`unhealthy_threshold\s*=\s*optional\(number,\s*(\d+)\)`),
		Deregistration: time.Duration(num(`(?s)variable "deregistration_delay".*?default\s*=\s*(\d+)`)) * time.Second,
		Port:           num(`(?s)variable "metrics_port".*?default\s*=\s*(\d+)`),
	}
	scaled = real
	scaled.Interval /= timeScale
	scaled.Timeout /= timeScale
	scaled.Deregistration /= timeScale
	return real, scaled
}

const (
	fleetID    = "spiffe://cluster.local/ns/legacy/sa/fwdproxy"
	webID      = "spiffe://cluster.local/ns/bookinfo/sa/web"
	dbID       = "spiffe://cluster.local/ns/bookinfo/sa/db"
	addedID    = "spiffe://cluster.local/ns/bookinfo/sa/added"
	opsID      = "spiffe://cluster.local/ns/bookinfo/sa/ops"
	httpPort   = 8080
	tcpPort    = 9000
	gossipPort = 7946
)

func meshHost(name string) string { return name + ".bookinfo.svc.cluster.local" }

// fleet is the running topology.
type fleet struct {
	t        *testing.T
	dir      string
	lan      *lan
	nlb, vm  *host
	ca       *meshtest.CA
	gateway  *meshtest.Gateway
	sidecars map[string]*meshtest.Sidecar
	catalog  string
	certs    string
	keyring  string
	timing   nlbTimings
	haproxy  *exec.Cmd
	hapSock  string
	mu       sync.Mutex
	inst     map[string]*instance
	seeds    []string
	rows     []row
}

// instance is one fwdproxy host.
type instance struct {
	f         *fleet
	name      string
	host      *host
	dataplane string
	dir       string
	keyring   string
	cmd       *exec.Cmd
	exited    chan error
	logs      *os.File
}

func (i *instance) adminClient() *admin.Client {
	return &admin.Client{Socket: filepath.Join(i.dir, "admin.sock")}
}

func newFleet(t *testing.T) *fleet {
	real, scaled := asgTimings(t)
	t.Logf("NLB stand-in: deploy/asg health check of /ready on port %d every %s (timeout %s), healthy after %d, unhealthy after %d, deregistration delay %s; run at 1/%d: every %s, delay %s",
		real.Port, real.Interval, real.Timeout, real.Healthy, real.Unhealthy, real.Deregistration, timeScale, scaled.Interval, scaled.Deregistration)
	metricsPort = real.Port
	f := &fleet{t: t, dir: t.TempDir(), timing: scaled, inst: map[string]*instance{}, sidecars: map[string]*meshtest.Sidecar{}}
	f.lan = newLAN(t)
	f.nlb = f.lan.addHost("nlb", 2)
	f.vm = f.lan.addHost("vm", 3)
	var err error
	if f.ca, err = meshtest.NewCA("cluster.local"); err != nil {
		t.Fatal(err)
	}
	// The mesh: an east-west gateway stand-in on the host side of the LAN, sidecars behind it.
	if f.gateway, err = meshtest.StartGateway(net.JoinHostPort(f.lan.hostIP, "0")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.gateway.Close() })
	for _, s := range []struct{ name, id, proto string }{{"web", webID, meshtest.HTTP}, {"db", dbID, meshtest.TCP}, {"added", addedID, meshtest.HTTP}, {"ops", opsID, meshtest.HTTP}} {
		sc, err := meshtest.StartSidecar(meshtest.SidecarOptions{Name: s.name, SPIFFEID: s.id, CA: f.ca, Protocol: s.proto})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sc.Close() })
		f.sidecars[s.name] = sc
		port := httpPort
		if s.proto == meshtest.TCP {
			port = tcpPort
		}
		f.gateway.Route(meshtest.Target{Host: meshHost(s.name), Port: uint32(port)}, sc.Addr())
	}
	f.certs = filepath.Join(f.dir, "certs")
	if err := os.MkdirAll(f.certs, 0o700); err != nil {
		t.Fatal(err)
	}
	leaf, err := f.ca.IssueFor(fleetID, 2*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := leaf.WriteFiles(f.certs, f.ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	f.keyring = f.writeKeyring("gossip.keys")
	f.catalog = filepath.Join(f.dir, "catalog.yaml")
	f.writeCatalog(false)
	for i := range 3 { // a, b and c are the seeds, as a static peers.seeds list would name them
		f.seeds = append(f.seeds, net.JoinHostPort(f.lan.addr(11+i), strconv.Itoa(gossipPort)))
	}
	f.startHAProxy([]string{"a", "b", "c", "d"})
	return f
}

func (f *fleet) writeKeyring(name string) string {
	p := filepath.Join(f.dir, name)
	if err := os.WriteFile(p, []byte(peers.GenerateKey()+"\n"), 0o600); err != nil {
		f.t.Fatal(err)
	}
	return p
}

func service(name string, port int, proto, id string) string {
	return fmt.Sprintf("  - host: %s\n    ports: [{number: %d, protocol: %s}]\n    identities: [%s]\n", meshHost(name), port, proto, id)
}

// writeCatalog replaces the catalog every instance's discovery reads (the shared source, as the
// Kubernetes API is for a real fleet); withAdded adds the service "added".
func (f *fleet) writeCatalog(withAdded bool) {
	s := "services:\n" + service("web", httpPort, "http", webID) + service("db", tcpPort, "tcp", dbID)
	if withAdded {
		s += service("added", httpPort, "http", addedID)
	}
	tmp := f.catalog + ".tmp"
	if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
		f.t.Fatal(err)
	}
	if err := os.Rename(tmp, f.catalog); err != nil {
		f.t.Fatal(err)
	}
}

// --- the NLB stand-in --------------------------------------------------------------------------

// startHAProxy runs HAProxy on the nlb host: per port a TCP listener and a backend of every
// instance (a target group), health-checked on /ready. Targets start deregistered (maint) and
// are registered as the Auto Scaling group launches them. No retry on another target: an NLB
// does not retry a connection that a target refused.
func (f *fleet) startHAProxy(targets []string) {
	f.hapSock = filepath.Join(f.dir, "haproxy.sock")
	var b strings.Builder
	fmt.Fprintf(&b, "global\n  stats socket %s mode 600 level admin\n  maxconn 4096\n", f.hapSock)
	fmt.Fprintf(&b, "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  timeout check %dms\n  retries 0\n",
		f.timing.Timeout.Milliseconds())
	for _, port := range []int{httpPort, tcpPort} {
		fmt.Fprintf(&b, "frontend fe_%d\n  bind %s:%d\n  default_backend tg_%d\n", port, f.nlb.ip, port, port)
		fmt.Fprintf(&b, "backend tg_%d\n  option httpchk GET /ready\n  http-check expect status 200\n", port)
		fmt.Fprintf(&b, "  default-server check port %d inter %dms rise %d fall %d disabled\n",
			metricsPort, f.timing.Interval.Milliseconds(), f.timing.Healthy, f.timing.Unhealthy)
		for i, name := range targets {
			fmt.Fprintf(&b, "  server %s %s:%d\n", name, f.lan.addr(11+i), port)
		}
	}
	cfg := filepath.Join(f.dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		f.t.Fatal(err)
	}
	logs := &meshtest.SyncBuffer{}
	f.haproxy = f.nlb.command("haproxy", "-db", "-f", cfg)
	f.haproxy.Stdout, f.haproxy.Stderr = logs, logs
	if err := f.haproxy.Start(); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() {
		_ = f.haproxy.Process.Kill()
		_ = f.haproxy.Wait()
		if f.t.Failed() {
			f.t.Logf("haproxy:\n%s", logs.String())
		}
	})
	meshtest.Eventually(f.t, 10*time.Second, "haproxy runtime API", func() bool { _, err := f.hap("show info"); return err == nil })
}

// hap sends one runtime API command.
func (f *fleet) hap(cmd string) (string, error) {
	c, err := net.DialTimeout("unix", f.hapSock, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	out, err := io.ReadAll(c)
	return string(out), err
}

func (f *fleet) hapAll(format string, name string) {
	f.t.Helper()
	for _, port := range []int{httpPort, tcpPort} {
		cmd := fmt.Sprintf(format, fmt.Sprintf("tg_%d/%s", port, name))
		if out, err := f.hap(cmd); err != nil || strings.TrimSpace(out) != "" {
			f.t.Fatalf("haproxy %q: %q %v", cmd, out, err)
		}
	}
}

// register adds an instance to the target groups: it takes traffic once healthy_threshold
// checks of /ready passed, as a newly registered NLB target.
func (f *fleet) register(name string) {
	// Leaving maintenance, HAProxy counts a server up until a check fails; an NLB target starts
	// unhealthy. Weight 0 keeps connections away while the state is forced down.
	f.hapAll("set server %s weight 0", name)
	f.hapAll("set server %s state ready", name)
	f.hapAll("set server %s health down", name)
	f.hapAll("set server %s weight 1", name)
}

// deregister stops new connections to an instance, lets the open ones run for the
// deregistration delay, then closes what is left (connection_termination) and removes it.
func (f *fleet) deregister(name string) {
	f.hapAll("set server %s state drain", name)
	time.Sleep(f.timing.Deregistration) // the NLB's delay itself, not a wait for a condition
	f.hapAll("shutdown sessions server %s", name)
	f.hapAll("set server %s state maint", name)
}

type targetStat struct {
	status   string // UP, DOWN, MAINT, DRAIN, ... (the first group's not UP, if any)
	sessions int    // total sessions (stot), both groups
}

// target is HAProxy's view of one target in both target groups: each group checks on its own,
// so the target counts as UP only when it is UP in both.
func (f *fleet) target(name string) (targetStat, error) {
	out, err := f.hap("show stat")
	if err != nil {
		return targetStat{}, err
	}
	var st targetStat
	found := false
	for _, line := range strings.Split(out, "\n") {
		fl := strings.Split(line, ",")
		if len(fl) < 18 || fl[1] != name || !strings.HasPrefix(fl[0], "tg_") {
			continue
		}
		n, _ := strconv.Atoi(fl[7])
		st.sessions += n
		if !found || strings.HasPrefix(st.status, "UP") && !strings.HasPrefix(fl[17], "UP") {
			st.status, found = fl[17], true
		}
	}
	if !found {
		return st, fmt.Errorf("target %s not in haproxy stats", name)
	}
	return st, nil
}

func (f *fleet) waitTarget(name string, want string, limit time.Duration) time.Time {
	f.t.Helper()
	meshtest.Eventually(f.t, limit, "target "+name+" "+want, func() bool {
		st, err := f.target(name)
		return err == nil && strings.HasPrefix(st.status, want)
	})
	return time.Now()
}

// --- instances ---------------------------------------------------------------------------------

// addInstance creates host n (address .11+n) for instance name; it does not start it.
func (f *fleet) addInstance(name string, n int, dataplane string) *instance {
	i := &instance{f: f, name: name, host: f.lan.addHost(name, 11+n), dataplane: dataplane, dir: filepath.Join(f.dir, name), keyring: f.keyring}
	if err := os.MkdirAll(i.dir, 0o700); err != nil {
		f.t.Fatal(err)
	}
	f.mu.Lock()
	f.inst[name] = i
	f.mu.Unlock()
	f.t.Cleanup(func() {
		i.kill()
		if f.t.Failed() && i.logs != nil {
			b, _ := os.ReadFile(i.logs.Name())
			if len(b) > 20000 {
				b = b[len(b)-20000:]
			}
			f.t.Logf("instance %s log (tail):\n%s", name, b)
		}
	})
	return i
}

func (i *instance) config() string {
	dp := "dataplane: builtin\nbuiltin: {drainTime: 2s}\n"
	if i.dataplane == "envoy" {
		bin, err := meshtest.EnvoyPath()
		if err != nil {
			i.f.t.Fatal(err)
		}
		dp = fmt.Sprintf("dataplane: envoy\nenvoy: {binary: %s, adminAddress: 127.0.0.1:15000, bootstrapPath: %s, drainTime: 2s}\n",
			bin, filepath.Join(i.dir, "envoy-bootstrap.json"))
	}
	f := i.f
	return fmt.Sprintf(`node: {id: %s}
gateways:
  - {name: eastwest, address: %s, port: %d}
identity:
  spiffeID: %s
  files: {certChain: %s, privateKey: %s, roots: %s}
discovery: {files: [%s]}
listen: {address: 0.0.0.0, accessLog: false}
xds: {socket: xds.sock}
metrics: {address: 0.0.0.0:%d}
admin: {socket: admin.sock}
peers:
  bind: %s:%d
  seeds: [%s]
  keyring: %s
upstream: {connectTimeout: 2s}
%s`, i.name, f.lan.hostIP, gwPort(f), fleetID,
		filepath.Join(f.certs, "cert-chain.pem"), filepath.Join(f.certs, "key.pem"), filepath.Join(f.certs, "root-cert.pem"),
		f.catalog, metricsPort, i.host.ip, gossipPort, strings.Join(f.seeds, ", "), i.keyring, dp)
}

func gwPort(f *fleet) int {
	_, p, _ := net.SplitHostPort(f.gateway.Addr())
	n, _ := strconv.Atoi(p)
	return n
}

// start runs the instance's daemon in its namespace.
func (i *instance) start() {
	t := i.f.t
	t.Helper()
	cfg := filepath.Join(i.dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte(i.config()), 0o600); err != nil {
		t.Fatal(err)
	}
	logs, err := os.OpenFile(filepath.Join(i.dir, "fwdproxy.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	i.logs = logs
	i.cmd = i.host.command(fwdproxyBin, "run", "--config", cfg, "--log-format", "text")
	i.cmd.Stdout, i.cmd.Stderr = logs, logs
	if err := i.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	i.exited = make(chan error, 1)
	go func(c *exec.Cmd, ch chan error) { ch <- c.Wait() }(i.cmd, i.exited)
}

// kill is the host dying: every process in its namespace gets SIGKILL.
func (i *instance) kill() {
	if i.cmd == nil {
		return
	}
	killNamespace(i.host.name)
	select {
	case <-i.exited:
	case <-time.After(10 * time.Second):
	}
	i.cmd = nil
}

// terminate is the termination lifecycle hook's stop: SIGTERM, then wait for the exit.
func (i *instance) terminate() error {
	if err := i.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case err := <-i.exited:
		i.cmd = nil
		return err
	case <-time.After(45 * time.Second):
		return errors.New("did not stop within 45s of SIGTERM")
	}
}

func (i *instance) status() (*admin.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return i.adminClient().Status(ctx)
}

// ready asks /ready as the NLB does.
func (i *instance) ready() (bool, string) {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(fmt.Sprintf("http://%s:%d/ready", i.host.ip, metricsPort))
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode == 200, strings.TrimSpace(string(b))
}

func (i *instance) waitReady(limit time.Duration) {
	t := i.f.t
	t.Helper()
	why := ""
	meshtest.Eventually(t, limit, "instance "+i.name+" ready", func() bool {
		select {
		case err := <-i.exited:
			i.exited <- err
			t.Fatalf("instance %s exited: %v", i.name, err)
		default:
		}
		var ok bool
		ok, why = i.ready()
		return ok
	})
	_ = why
}

// statusText is what an operator sees: fwdproxy status run against the instance's socket.
func (i *instance) statusText() string {
	out, _ := exec.Command(fwdproxyBin, "status", "--admin", filepath.Join(i.dir, "admin.sock")).CombinedOutput()
	return string(out)
}

// metric reads one sample of the instance's /metrics, e.g. `fwdproxy_gossip_converged` or
// `fwdproxy_gossip_member_states{state="dead"}`; -1 when absent.
func (i *instance) metric(sample string) float64 {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://%s:%d/metrics", i.host.ip, metricsPort))
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

func (i *instance) logText() string {
	b, _ := os.ReadFile(filepath.Join(i.dir, "fwdproxy.log"))
	return string(b)
}

func memberState(st *admin.Status, name string) string {
	for _, m := range st.Members {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

// --- the legacy VMs ----------------------------------------------------------------------------

// resolve is the DNS rewrite as deploy/asg's Route 53 wildcard record answers it: every name in
// the mesh zone is the NLB.
func (f *fleet) resolve(hostport string) (string, error) {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", err
	}
	if strings.HasSuffix(h, ".svc.cluster.local") {
		return net.JoinHostPort(f.nlb.ip, p), nil
	}
	return hostport, nil
}

// vmHTTP is a legacy VM's HTTP client: one connection per request (as many legacy clients
// do), so the NLB balances every request.
func (f *fleet) vmHTTP(direct string) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			to, err := f.resolve(addr)
			if direct != "" {
				_, p, _ := net.SplitHostPort(addr)
				to = net.JoinHostPort(direct, p)
			}
			if err != nil {
				return nil, err
			}
			return f.vm.dial(ctx, network, to)
		},
	}}
}

// get fetches a mesh service from a VM; via is "" for the NLB or an instance's address.
func (f *fleet) get(client *http.Client, name string) error {
	resp, err := client.Get(fmt.Sprintf("http://%s:%d/", meshHost(name), httpPort))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(body))
	}
	r, err := meshtest.ParseReport(string(body))
	if err != nil {
		return err
	}
	if r.Service != name || r.Caller != fleetID {
		return fmt.Errorf("sidecar saw service %q caller %q", r.Service, r.Caller)
	}
	return nil
}

// tcpRoundTrip opens the TCP service through the NLB, reads the sidecar's report and checks an
// echo.
func (f *fleet) tcpRoundTrip(ctx context.Context) error {
	to, _ := f.resolve(net.JoinHostPort(meshHost("db"), strconv.Itoa(tcpPort)))
	c, err := f.vm.dial(ctx, "tcp", to)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	r, err := meshtest.ReadReportLine(br)
	if err != nil {
		return err
	}
	if r.Service != "db" {
		return fmt.Errorf("tcp: sidecar saw service %q", r.Service)
	}
	msg := "ping " + strconv.FormatInt(time.Now().UnixNano(), 10) + "\n"
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got, err := br.ReadString('\n')
	if err != nil || got != msg {
		return fmt.Errorf("echo: got %q, %v", got, err)
	}
	return nil
}

// --- load --------------------------------------------------------------------------------------

type op struct {
	start, end time.Time
	kind       string
	err        error
}

// load is steady traffic from the VM host: HTTP requests and TCP sessions through the NLB, each
// worker pacing itself, bounded in count and time.
type load struct {
	f    *fleet
	stop chan struct{}
	wg   sync.WaitGroup
	mu   sync.Mutex
	ops  []op
	sent atomic.Int64
}

const (
	loadPause  = 15 * time.Millisecond
	loadMaxOps = 40000
	loadMaxFor = 5 * time.Minute
)

func (f *fleet) startLoad() *load {
	l := &load{f: f, stop: make(chan struct{})}
	client := f.vmHTTP("")
	work := func(kind string, do func() error) {
		defer l.wg.Done()
		deadline := time.Now().Add(loadMaxFor)
		for time.Now().Before(deadline) && l.sent.Load() < loadMaxOps {
			select {
			case <-l.stop:
				return
			case <-time.After(loadPause):
			}
			o := op{start: time.Now(), kind: kind}
			o.err = do()
			o.end = time.Now()
			l.sent.Add(1)
			l.mu.Lock()
			l.ops = append(l.ops, o)
			l.mu.Unlock()
		}
	}
	l.wg.Add(3)
	go work("http", func() error { return f.get(client, "web") })
	go work("http", func() error { return f.get(client, "web") })
	go work("tcp", func() error { return f.tcpRoundTrip(context.Background()) })
	return l
}

func (l *load) halt() {
	close(l.stop)
	l.wg.Wait()
}

// window summarizes the operations that started in [from, to).
type window struct {
	sent, failed int
	http, tcp    [2]int // sent, failed
	lastFail     time.Time
	firstErr     error
}

func (l *load) window(from, to time.Time) window {
	l.mu.Lock()
	defer l.mu.Unlock()
	var w window
	for _, o := range l.ops {
		if o.start.Before(from) || !o.start.Before(to) {
			continue
		}
		w.sent++
		k := &w.http
		if o.kind == "tcp" {
			k = &w.tcp
		}
		k[0]++
		if o.err != nil {
			w.failed++
			k[1]++
			if o.end.After(w.lastFail) {
				w.lastFail = o.end
			}
			if w.firstErr == nil {
				w.firstErr = o.err
			}
		}
	}
	return w
}

// waitSent waits until n more operations completed (the load is flowing).
func (l *load) waitSent(t testing.TB, n int64) {
	t.Helper()
	base := l.sent.Load()
	meshtest.Eventually(t, 20*time.Second, "load flowing", func() bool { return l.sent.Load() >= base+n })
}

// --- report ------------------------------------------------------------------------------------

type row struct {
	scenario string
	w        window
	recover  time.Duration
	notes    string
}

func (f *fleet) record(scenario string, w window, from time.Time, notes string) row {
	r := row{scenario: scenario, w: w, notes: notes}
	if w.failed > 0 {
		r.recover = w.lastFail.Sub(from).Round(time.Millisecond)
	}
	f.rows = append(f.rows, r)
	f.t.Logf("%s: sent %d (http %d, tcp %d), failed %d (http %d, tcp %d), recovered after %s; %s",
		scenario, w.sent, w.http[0], w.tcp[0], w.failed, w.http[1], w.tcp[1], r.recover, notes)
	if w.firstErr != nil {
		f.t.Logf("%s: first failure: %v", scenario, w.firstErr)
	}
	return r
}

func (f *fleet) report() {
	var b strings.Builder
	fmt.Fprintf(&b, "fleet failure scenarios (NLB times at 1/%d; %d CPUs; load: 2 HTTP + 1 TCP clients, one connection per request):\n", timeScale, runtime.NumCPU())
	fmt.Fprintf(&b, "| scenario | sent | failed | recovered after | measured |\n|---|---|---|---|---|\n")
	for _, r := range f.rows {
		fmt.Fprintf(&b, "| %s | %d | %d | %s | %s |\n", r.scenario, r.w.sent, r.w.failed, r.recover, r.notes)
	}
	f.t.Log(b.String())
	if p := os.Getenv("FWDPROXY_FLEET_REPORT"); p != "" {
		_ = os.WriteFile(p, []byte(b.String()), 0o644)
	}
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

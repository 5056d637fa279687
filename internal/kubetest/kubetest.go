// Package kubetest runs a real Kubernetes control plane for tests: Debian's etcd, and
// kube-apiserver and kube-controller-manager (only its EndpointSlice controller) built from
// k8s.io/kubernetes by scripts/kube-bin. Everything listens on loopback: etcd on Unix sockets in
// the test's directory, the API server on a random 127.x.y.z address of its own. There is no
// kubelet and no scheduler: tests create Nodes and Pods (already bound) and set Pod status
// themselves, and the EndpointSlice controller turns them into EndpointSlices as in a real
// cluster. The API server authorizes with RBAC; Admin is a system:masters client certificate,
// ServiceAccount returns a config authenticated with a service-account token.
package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Cluster is a running control plane.
type Cluster struct {
	// Admin is a system:masters client: it sets up what the test needs.
	Admin     *rest.Config
	Clientset kubernetes.Interface
	// Host is https://ADDR:PORT, the API server.
	Host string

	t       testing.TB
	dir     string
	bin     string
	addr    string
	port    int
	caPEM   []byte
	logs    map[string]*bytes.Buffer
	mu      sync.Mutex
	procs   map[string]*exec.Cmd
	waiters map[string]chan struct{}
}

// Binaries returns the directory holding kube-apiserver and kube-controller-manager, building
// them first if they are not cached (scripts/kube-bin; slow the first time on a machine).
func Binaries(t testing.TB) string {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "kube-bin"))
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("scripts/kube-bin (builds kube-apiserver; run scripts/test-deps or make deps): %v\n%s", err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "scripts", "kube-bin")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("scripts/kube-bin not found above the test's directory")
		}
		dir = parent
	}
}

// Etcd returns the path of Debian's etcd, or fails the test saying how to install it.
func Etcd(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("etcd is missing; install it with: sudo apt-get install -y etcd-server (or run scripts/test-deps)")
	}
	return p
}

// Start runs etcd, the API server and the EndpointSlice controller, and stops them when the test
// ends.
func Start(t testing.TB) *Cluster {
	t.Helper()
	etcd := Etcd(t)
	c := &Cluster{t: t, dir: t.TempDir(), bin: Binaries(t), logs: map[string]*bytes.Buffer{},
		procs: map[string]*exec.Cmd{}, waiters: map[string]chan struct{}{}}
	t.Cleanup(c.stopAll)
	c.writeCredentials()

	// etcd on Unix sockets (relative to its directory): no port to choose at all.
	c.start("etcd", etcd, "--name", "test", "--data-dir", filepath.Join(c.dir, "etcd"),
		"--listen-client-urls", "unix://etcd-client:0", "--advertise-client-urls", "unix://etcd-client:0",
		"--listen-peer-urls", "unix://etcd-peer:0", "--initial-advertise-peer-urls", "unix://etcd-peer:0",
		"--initial-cluster", "test=unix://etcd-peer:0", "--unsafe-no-fsync", "--log-level", "warn")
	c.waitFor("etcd", func() bool {
		conn, err := net.Dial("unix", filepath.Join(c.dir, "etcd-client:0"))
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
	c.StartAPIServer()

	kubeconfig := filepath.Join(c.dir, "admin.kubeconfig")
	if err := os.WriteFile(kubeconfig, c.kubeconfig(), 0o600); err != nil {
		t.Fatal(err)
	}
	c.start("kube-controller-manager", filepath.Join(c.bin, "kube-controller-manager"),
		"--kubeconfig", kubeconfig, "--controllers", "endpointslice", "--leader-elect=false",
		"--secure-port=0", "--use-service-account-credentials=false", "--concurrent-service-endpoint-syncs=2")
	return c
}

// pickAddress chooses the API server's address: a random 127.x.y.z of its own and a port free
// there. kube-apiserver cannot bind port 0 (--secure-port 0 turns serving off), so the port is
// taken from the kernel and released; on an address no one else uses, nothing takes it meanwhile.
func (c *Cluster) pickAddress() {
	var b [3]byte
	_, _ = rand.Read(b[:])
	if b[2] == 0 || b[2] == 255 {
		b[2] = 7
	}
	addr := fmt.Sprintf("127.%d.%d.%d", b[0], b[1], b[2])
	l, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		c.t.Fatal(err)
	}
	c.port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	c.addr = addr
	c.Host = "https://" + net.JoinHostPort(addr, strconv.Itoa(c.port))
}

// StartAPIServer starts the API server (again, after StopAPIServer: same address, same etcd).
func (c *Cluster) StartAPIServer() {
	c.t.Helper()
	p := func(name string) string { return filepath.Join(c.dir, name) }
	c.start("kube-apiserver", filepath.Join(c.bin, "kube-apiserver"),
		"--etcd-servers", "unix://etcd-client:0",
		"--bind-address", c.addr, "--advertise-address", c.addr, "--secure-port", strconv.Itoa(c.port),
		"--tls-cert-file", p("serving.pem"), "--tls-private-key-file", p("serving-key.pem"),
		"--client-ca-file", p("ca.pem"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", p("sa-key.pem"), "--service-account-signing-key-file", p("sa-key.pem"),
		"--authorization-mode", "RBAC",
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--endpoint-reconciler-type", "none",
		"--disable-admission-plugins", "ServiceAccount",
		"--enable-priority-and-fairness=false", "--profiling=false",
		"--cert-dir", p("apiserver-certs"))
	hc := c.httpClient()
	c.waitFor("kube-apiserver", func() bool {
		resp, err := hc.Get(c.Host + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if c.Clientset == nil {
		cs, err := kubernetes.NewForConfig(c.Admin)
		if err != nil {
			c.t.Fatal(err)
		}
		c.Clientset = cs
	}
}

// StopAPIServer kills the API server and waits for it to exit: clients see connections refused.
func (c *Cluster) StopAPIServer() {
	c.t.Helper()
	c.stop("kube-apiserver")
}

// ServiceAccount returns a client config authenticated as ns/name with a token from the
// TokenRequest API (the service account must exist).
func (c *Cluster) ServiceAccount(ns, name string) *rest.Config {
	c.t.Helper()
	exp := int64(3600)
	tr, err := c.Clientset.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatalf("token for service account %s/%s: %v", ns, name, err)
	}
	return &rest.Config{Host: c.Host, BearerToken: tr.Status.Token, TLSClientConfig: rest.TLSClientConfig{CAData: c.caPEM},
		QPS: 100, Burst: 200}
}

// Logs returns what a component has printed so far.
func (c *Cluster) Logs(name string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b := c.logs[name]; b != nil {
		return b.String()
	}
	return ""
}

func (c *Cluster) start(name, bin string, args ...string) {
	c.t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = c.dir
	c.mu.Lock()
	buf := c.logs[name]
	if buf == nil {
		buf = &bytes.Buffer{}
		c.logs[name] = buf
	}
	c.mu.Unlock()
	w := &lockedWriter{mu: &c.mu, b: buf}
	cmd.Stdout, cmd.Stderr = w, w
	// Its own process group, and SIGKILL to it if the test binary dies first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("%s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	c.mu.Lock()
	c.procs[name], c.waiters[name] = cmd, done
	c.mu.Unlock()
}

func (c *Cluster) stop(name string) {
	c.mu.Lock()
	cmd, done := c.procs[name], c.waiters[name]
	delete(c.procs, name)
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		c.t.Errorf("%s did not exit", name)
	}
}

func (c *Cluster) stopAll() {
	for _, name := range []string{"kube-controller-manager", "kube-apiserver", "etcd"} {
		c.stop(name)
	}
	if c.t.Failed() {
		for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager"} {
			log := c.Logs(name)
			if len(log) > 6000 {
				log = "..." + log[len(log)-6000:]
			}
			c.t.Logf("%s output (tail):\n%s", name, log)
		}
	}
}

// waitFor polls ready (bounded: 180 s; an API server on a busy machine is slow to start).
func (c *Cluster) waitFor(name string, ready func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(180 * time.Second)
	for !ready() {
		c.mu.Lock()
		done := c.waiters[name]
		c.mu.Unlock()
		select {
		case <-done:
			c.t.Fatalf("%s exited while starting:\n%s", name, c.Logs(name))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not ready within 180s:\n%s", name, c.Logs(name))
		}
	}
}

func (c *Cluster) httpClient() *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.caPEM)
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.b.Len() > 4<<20 { // keep memory bounded on a chatty component
		w.b.Reset()
	}
	return w.b.Write(p)
}

// writeCredentials makes the CA, the API server's serving certificate, the admin client
// certificate and the service-account signing key.
func (c *Cluster) writeCredentials() {
	t := c.t
	t.Helper()
	caKey := newKey(t)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubetest CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	c.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	c.write("ca.pem", c.caPEM)
	issue := func(serial int64, subj pkix.Name, ips []net.IP, usage x509.ExtKeyUsage) ([]byte, []byte) {
		key := newKey(t)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: subj, IPAddresses: ips,
			DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM(t, key)
	}
	c.pickAddress() // the serving certificate names the address
	cert, key := issue(2, pkix.Name{CommonName: "kube-apiserver"}, []net.IP{net.ParseIP(c.addr), net.ParseIP("127.0.0.1")}, x509.ExtKeyUsageServerAuth)
	c.write("serving.pem", cert)
	c.write("serving-key.pem", key)
	cert, key = issue(3, pkix.Name{CommonName: "kubetest-admin", Organization: []string{"system:masters"}}, nil, x509.ExtKeyUsageClientAuth)
	c.Admin = &rest.Config{Host: c.Host, TLSClientConfig: rest.TLSClientConfig{CAData: c.caPEM, CertData: cert, KeyData: key}, QPS: 100, Burst: 200}
	c.write("sa-key.pem", keyPEM(t, newKey(t)))
}

// kubeconfig is the admin's, for the controller manager.
func (c *Cluster) kubeconfig() []byte {
	enc := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, certificate-authority-data: %s}
users:
- name: admin
  user: {client-certificate-data: %s, client-key-data: %s}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, c.Host, enc(c.caPEM), enc(c.Admin.CertData), enc(c.Admin.KeyData))
}

func (c *Cluster) write(name string, data []byte) {
	if err := os.WriteFile(filepath.Join(c.dir, name), data, 0o600); err != nil {
		c.t.Fatal(err)
	}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func keyPEM(t testing.TB, k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

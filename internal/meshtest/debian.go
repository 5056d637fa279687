//go:build linux

package meshtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// The same mesh roles played by independent TLS stacks from Debian: HAProxy routes raw TLS by
// req.ssl_sni as the east-west gateway or terminates mTLS as an HTTP sidecar; nginx's stream
// module terminates mTLS as a TCP sidecar (its http module refuses Istio's ALPN names).

// NginxStreamModule is where Debian's libnginx-mod-stream installs the stream module.
var NginxStreamModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

// Process is a system daemon started in the foreground with its files in Dir.
type Process struct {
	Name string
	Dir  string
	Addr string
	// Admin is Envoy's admin address (host:port); "" for other daemons.
	Admin string
	cmd   *exec.Cmd
	log   string
	done  chan struct{}
	err   error
	// onStop runs after the process ended (applications started beside it).
	onStop []func()
}

// startProcess runs bin with args, logging to dir/name.log, and waits until every addr accepts.
func startProcess(name, dir string, addrs []string, bin string, args ...string) (*Process, error) {
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, Dir: dir, Addr: addrs[0], cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	deadline := time.Now().Add(15 * time.Second)
	for len(addrs) > 0 {
		addr := addrs[0]
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			addrs = addrs[1:]
			continue
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s exited before accepting on %s (%v): %s", name, addr, p.err, p.Output())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("%s does not accept on %s after 15s: %s", name, addr, p.Output())
		}
	}
	return p, nil
}

// Output is what the process logged so far.
func (p *Process) Output() string {
	b, _ := os.ReadFile(p.log)
	return strings.TrimSpace(string(b))
}

// Stop terminates the process (SIGTERM, then SIGKILL after 5s) and waits for it.
func (p *Process) Stop() error {
	defer func() {
		for _, f := range p.onStop {
			f()
		}
		p.onStop = nil
	}()
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	return nil
}

// StartHAProxyGateway runs HAProxy as an AUTO_PASSTHROUGH east-west gateway on addr: a TCP
// frontend that waits for the ClientHello and picks the backend by req.ssl_sni; an unknown SNI
// matches no backend and the connection is closed.
func StartHAProxyGateway(dir, addr string, routes map[Target]string) (*Process, error) {
	bin, err := LookPath("haproxy", "haproxy")
	if err != nil {
		return nil, err
	}
	targets := make([]Target, 0, len(routes))
	for t := range routes {
		targets = append(targets, t)
	}
	slices.SortFunc(targets, func(a, b Target) int { return strings.Compare(a.SNI(), b.SNI()) })
	var b strings.Builder
	fmt.Fprintf(&b, `global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 5m
  timeout server 5m
frontend eastwest
  bind %s
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
`, addr)
	for i, t := range targets {
		fmt.Fprintf(&b, "  use_backend sidecar%d if { req.ssl_sni -m str %s }\n", i, t.SNI())
	}
	for i, t := range targets {
		fmt.Fprintf(&b, "backend sidecar%d\n  server s %s\n", i, routes[t])
	}
	name := "haproxy-gateway-" + strings.ReplaceAll(addr, ":", "-")
	cfg := filepath.Join(dir, name+".cfg")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	return startProcess(name, dir, []string{addr}, bin, "-db", "-f", cfg)
}

// writeIdentity issues a leaf for spiffeID and writes name.pem (chain + key, HAProxy's format,
// 0600), name-chain.pem, name-key.pem (0600) and root.pem into dir.
func writeIdentity(dir, name string, ca *CA, spiffeID string) error {
	leaf, err := ca.IssueFor(spiffeID, 24*time.Hour)
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{name + ".pem", slices.Concat(leaf.ChainPEM, leaf.KeyPEM), 0o600},
		{name + "-chain.pem", leaf.ChainPEM, 0o644},
		{name + "-key.pem", leaf.KeyPEM, 0o600},
		{"root.pem", ca.RootPEM, 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// StartHAProxySidecars runs one HAProxy with an HTTP sidecar per option, each on its o.Addr
// (required): it terminates TLS with an Istio-style leaf for o.SPIFFEID, requires a client chain
// to the root only (verify required, ca-file root), negotiates only Istio's ALPN names, appends
// its XFCC entry (without URI=, which HAProxy cannot read), takes out the caller's peer metadata
// headers as Istio's inbound filter does (reporting them raw) and answers every request with a
// Report line built from its own view of the connection (ssl_c_verify, ssl_c_der, ssl_fc_sni,
// ssl_fc_alpn) and of the request's headers. HTTP/2 with prior knowledge is detected from the
// connection preface.
func StartHAProxySidecars(dir string, opts ...SidecarOptions) (*Process, error) {
	bin, err := LookPath("haproxy", "haproxy")
	if err != nil {
		return nil, err
	}
	var b strings.Builder
	b.WriteString(`global
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 5m
  timeout server 5m
  timeout http-request 10s
`)
	var addrs []string
	var echoes []*EchoServer
	stopEchoes := func() {
		for _, e := range echoes {
			e.Stop()
		}
	}
	for _, o := range opts {
		if (o.Protocol != HTTP && o.Protocol != GRPC) || o.Addr == "" || o.CA == nil || len(o.AllowedCallers) > 0 {
			stopEchoes()
			return nil, errors.New("meshtest: an HAProxy sidecar is HTTP or gRPC, needs Addr and CA, and has no AllowedCallers")
		}
		name := "haproxy-sidecar-" + o.Name
		if err := writeIdentity(dir, name, o.CA, o.SPIFFEID); err != nil {
			return nil, err
		}
		// XFCC as an Istio sidecar appends it (APPEND_FORWARD), as far as HAProxy 2.6 can: it has
		// no fetch for the caller's URI SAN, so its entry has By, Hash and Subject but no URI; the
		// subject is in OpenSSL's /K=V form, not RFC 2253 (the same for Istio's empty subjects);
		// it keeps only the last of several incoming XFCC headers.
		entry := fmt.Sprintf(`By=%s;Hash=%%[ssl_c_der,sha2(256),hex,lower];Subject=\"%%[ssl_c_s_dn]\"`, o.SPIFFEID)
		if o.Protocol == GRPC {
			// The application is the Echo service, reached over HTTP/2 (h2c).
			echo, err := NewEchoServer()
			if err != nil {
				stopEchoes()
				return nil, err
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				stopEchoes()
				return nil, err
			}
			echoes = append(echoes, echo)
			go func() { _ = echo.Serve(ln) }()
			fmt.Fprintf(&b, `frontend %s
  bind %s ssl crt %s ca-file %s verify required alpn %s
  http-request set-header x-forwarded-client-cert "%%[req.fhdr(x-forwarded-client-cert)],%s" if { req.fhdr_cnt(x-forwarded-client-cert) gt 0 }
  http-request set-header x-forwarded-client-cert "%s" unless { req.fhdr_cnt(x-forwarded-client-cert) gt 0 }
  default_backend app-%s
backend app-%s
  server app %s proto h2
`, o.Name, o.Addr, filepath.Join(dir, name+".pem"), filepath.Join(dir, "root.pem"), strings.Join(IstioALPN, ","), entry, entry, o.Name, o.Name, ln.Addr())
			addrs = append(addrs, o.Addr)
			continue
		}
		// Istio's inbound peer_metadata filter: the caller's peer metadata headers are taken out
		// before the application (reported raw: HAProxy cannot decode a protobuf Struct, the
		// report's reader does), and the sidecar answers with its own for each one received.
		own, err := PeerMetadataValue(sidecarMetadata(o.Name))
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(&b, `frontend %s
  bind %s ssl crt %s ca-file %s verify required alpn %s
  http-request set-header x-forwarded-client-cert "%%[req.fhdr(x-forwarded-client-cert)],%s" if { req.fhdr_cnt(x-forwarded-client-cert) gt 0 }
  http-request set-header x-forwarded-client-cert "%s" unless { req.fhdr_cnt(x-forwarded-client-cert) gt 0 }
  http-request set-var(txn.peerid) req.fhdr(x-envoy-peer-metadata-id) if { req.fhdr_cnt(x-envoy-peer-metadata-id) gt 0 }
  http-request set-var(txn.peermd) req.fhdr(x-envoy-peer-metadata) if { req.fhdr_cnt(x-envoy-peer-metadata) gt 0 }
  http-request del-header x-envoy-peer-metadata-id
  http-request del-header x-envoy-peer-metadata
  http-after-response set-header x-envoy-peer-metadata-id "%s" if { var(txn.peerid) -m found }
  http-after-response set-header x-envoy-peer-metadata "%s" if { var(txn.peermd) -m found }
  http-request return status 200 content-type text/plain lf-string "service=%s verify=%%[ssl_c_verify] cert=%%[ssl_c_der,base64] serial=%%[ssl_c_serial,hex] sni=%%[ssl_fc_sni] alpn=%%[ssl_fc_alpn] host=%%[req.hdr(host)] proto=HTTP/%%[req.ver] method=%%[method] path=%%[path] peerid=%%[var(txn.peerid),url_enc] peermetadata=%%[var(txn.peermd),url_enc] xfcc=%%[req.fhdr(x-forwarded-client-cert),url_enc] requestid=%%[req.fhdr(x-request-id),url_enc] external=%%[req.fhdr(x-envoy-external-address),url_enc] headers=%%[req.hdr_names,lower]"
`, o.Name, o.Addr, filepath.Join(dir, name+".pem"), filepath.Join(dir, "root.pem"), strings.Join(IstioALPN, ","), entry, entry,
			sidecarNodeID(o.Name), own, o.Name)
		addrs = append(addrs, o.Addr)
	}
	if len(addrs) == 0 {
		return nil, errors.New("meshtest: no sidecars")
	}
	name := "haproxy-sidecars-" + strings.ReplaceAll(addrs[0], ":", "-")
	path := filepath.Join(dir, name+".cfg")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		stopEchoes()
		return nil, err
	}
	p, err := startProcess(name, dir, addrs, bin, "-db", "-f", path)
	if err != nil {
		stopEchoes()
		return nil, err
	}
	p.onStop = append(p.onStop, stopEchoes)
	return p, nil
}

// StartNginxSidecar runs nginx's stream module as a TCP sidecar on o.Addr (required):
// ssl_verify_client on against the root only, ssl_alpn limited to Istio's names, and a Report
// line (return) built from nginx's view: $ssl_client_verify, $ssl_client_escaped_cert,
// $ssl_server_name, $ssl_alpn_protocol. It then closes the connection.
func StartNginxSidecar(dir string, o SidecarOptions) (*Process, error) {
	bin, err := LookPath("nginx", "nginx")
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(NginxStreamModule); err != nil {
		return nil, fmt.Errorf("nginx stream module %s missing: install it with `apt-get install -y libnginx-mod-stream`", NginxStreamModule)
	}
	if o.Protocol != TCP || o.Addr == "" || o.CA == nil || len(o.AllowedCallers) > 0 {
		return nil, errors.New("meshtest: the nginx sidecar is TCP only, needs Addr and CA, and has no AllowedCallers")
	}
	name := "nginx-sidecar-" + o.Name
	if err := writeIdentity(dir, name, o.CA, o.SPIFFEID); err != nil {
		return nil, err
	}
	prefix := filepath.Join(dir, name)
	if err := os.MkdirAll(prefix, 0o755); err != nil {
		return nil, err
	}
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;" // workers read nothing after start, but keep them able to
	}
	cfg := fmt.Sprintf(`load_module %s;
%s
daemon off;
master_process on;
worker_processes 1;
pid %s/nginx.pid;
error_log %s/error.log info;
events { worker_connections 4096; }
stream {
  server {
    listen %s ssl;
    ssl_certificate %s;
    ssl_certificate_key %s;
    ssl_client_certificate %s;
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_alpn %s;
    return "service=%s verify=$ssl_client_verify certpem=$ssl_client_escaped_cert serial=$ssl_client_serial sni=$ssl_server_name alpn=$ssl_alpn_protocol\n";
  }
}
`, NginxStreamModule, user, prefix, prefix, o.Addr,
		filepath.Join(dir, name+"-chain.pem"), filepath.Join(dir, name+"-key.pem"), filepath.Join(dir, "root.pem"),
		strings.Join(IstioALPN, " "), o.Name)
	path := filepath.Join(dir, name+".conf")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	return startProcess(name, dir, []string{o.Addr}, bin, "-e", filepath.Join(prefix, "startup.log"), "-p", prefix, "-c", path)
}

// Package admin is the daemon's fleet admin API (JSON over HTTP) and its client, used by
// fwdproxy apply, delete and status. It changes every instance's configuration, so every caller
// authenticates: on the Unix socket (the default) by its user, which the kernel reports (root,
// the daemon's user or the admin group), on TCP by a named bearer token or a client
// certificate, loopback included (see config.Admin). The audit log names the principal.
//
//	GET    /v1/status            this instance, the members and their digests, identity expiry,
//	                             the services left out of the configuration
//	GET    /v1/services          the operator entries
//	POST   /v1/services          upsert the services of a catalog document (YAML or JSON)
//	DELETE /v1/services/{host}   delete an operator entry
//	POST   /v1/services/delete   delete many operator entries in one request: {"hosts": [...]}
//	                             or {"allApplied": true}
package admin

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/ratelog"
	"github.com/fwdproxy/fwdproxy/internal/tlsfiles"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

// MaxBody bounds a request body.
const MaxBody = 8 << 20

// Fleet is the replicated store of operator entries (peers.Node implements it).
type Fleet interface {
	Apply([]catalog.Service) (int, error)
	Delete(hosts []string) []string
	OperatorServices() []catalog.Service
}

// Status is what GET /v1/status returns.
type Status struct {
	Node string `json:"node"`
	// Gossip is false on an instance running alone (peers.bind empty).
	Gossip    bool           `json:"gossip"`
	Leader    bool           `json:"leader"`
	Digest    string         `json:"digest,omitempty"`
	Entries   int            `json:"entries"`
	Converged bool           `json:"converged"`
	Members   []peers.Member `json:"members,omitempty"`
	// Fleet is this instance's view of the fleet's health (suspect and dead members, a suspected
	// partition, isolation, why it is not converged); nil without gossip.
	Fleet *peers.Health `json:"fleet,omitempty"`
	// ConfigVersion is the content hash of the xDS snapshot this instance serves.
	ConfigVersion string    `json:"configVersion,omitempty"`
	Ready         bool      `json:"ready"`
	ReadyReason   string    `json:"readyReason"`
	Identity      *Identity `json:"identity,omitempty"`
	// Skipped are the services this instance leaves out of the configuration it serves, because
	// translation cannot place them (every other service is served), sorted by host.
	Skipped []SkippedService `json:"skipped,omitempty"`
	// Services is every service of the catalog this instance translated, sorted by host, each
	// served or skipped (with the reason); empty before the first configuration is built.
	Services []ServiceState `json:"services,omitempty"`
	// Kubernetes are the discovered clusters' connections to their API servers.
	Kubernetes []KubernetesSource `json:"kubernetes,omitempty"`
}

// Service states in Status.Services.
const (
	StateServed  = "served"
	StateSkipped = "skipped"
)

// ServiceState is one service as this instance serves it: State is served or skipped; a
// skipped one has the Reason and Detail of its SkippedService.
type ServiceState struct {
	Host   string   `json:"host"`
	State  string   `json:"state"`
	Ports  []uint32 `json:"ports,omitempty"`
	Reason string   `json:"reason,omitempty"`
	Detail string   `json:"detail,omitempty"`
}

// DeleteRequest is the body of POST /v1/services/delete: the hosts to delete, or every operator
// entry (AllApplied).
type DeleteRequest struct {
	Hosts      []string `json:"hosts,omitempty"`
	AllApplied bool     `json:"allApplied,omitempty"`
}

// DeleteResult says which of the requested entries existed (and are gone) and which did not.
type DeleteResult struct {
	Deleted []string `json:"deleted"`
	Missing []string `json:"missing,omitempty"`
}

// KubernetesSource is one cluster's connection: whether its list/watch calls succeed, since
// when, and the last error while they fail. Running is false where this instance does not run
// discovery (not the gossip leader) or has not started it yet.
type KubernetesSource struct {
	Source    string    `json:"source"`
	Running   bool      `json:"running"`
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"`
	LastError string    `json:"lastError,omitempty"`
}

// SkippedService is a service left out of the configuration: Reason is the reason label of
// fwdproxy_translation_services_skipped (conflict, invalid, no_gateway_address).
type SkippedService struct {
	Host   string `json:"host"`
	Reason string `json:"reason"`
	Detail string `json:"detail"`
}

// Identity is the fleet certificate as this instance holds it (never the key).
type Identity struct {
	SPIFFEID string    `json:"spiffeID"`
	NotAfter time.Time `json:"notAfter"`
}

// Server serves the admin API.
type Server struct {
	// Fleet is nil when gossip is off: apply and delete then answer 409 with the fix.
	Fleet  Fleet
	Status func() Status
	// Tokens authenticate TCP callers (Authorization: Bearer SECRET). A TCP caller needs one of
	// them, or a verified client certificate when the listener is TLS with client
	// certificates, or both when both are configured; with neither, TCP callers are refused.
	Tokens []Token
	// Local admits callers on the Unix socket (ServeSocket) by their peer credentials.
	Local   localsock.Policy
	Catalog catalog.Options
	Log     *slog.Logger
	// Refused, when set, is told of every request or connection refused: "unauthorized" (no or
	// a wrong token) or "tls" (a failed handshake), for a metric. Each kind is logged only a
	// few times a minute.
	Refused func(reason string)

	logLimit ratelog.Limiter
}

// refuse counts a refusal and logs it unless its kind was logged often enough this minute.
func (s *Server) refuse(reason, msg string, args ...any) {
	if s.Refused != nil {
		s.Refused(reason)
	}
	if ok, left := s.logLimit.Allow(reason); ok {
		s.Log.Warn(msg, append(args, "not_logged_since_last", left)...)
	}
}

// serverLog takes what Go's HTTP server logs (chiefly "http: TLS handshake error from ...",
// one line per connection that is not TLS or has no valid client certificate) and counts and
// rate-limits it instead of writing it to stderr.
type serverLog struct{ s *Server }

func (l serverLog) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	if strings.Contains(line, "TLS handshake error") {
		l.s.refuse("tls", "admin connection refused: TLS handshake failed", "detail", line)
		return len(p), nil
	}
	if ok, left := l.s.logLimit.Allow("server"); ok {
		l.s.Log.Warn("admin server", "detail", line, "not_logged_since_last", left)
	}
	return len(p), nil
}

// Token is a named bearer token; the name appears in the audit log, never the secret.
type Token struct{ Name, Secret string }

// MinTokenLength is the shortest secret accepted.
const MinTokenLength = 16

// ParseTokens reads a token file: one token per line, "NAME SECRET" or just "SECRET" (named
// "default"); blank lines and lines starting with # are skipped.
func ParseTokens(data []byte) ([]Token, error) {
	var out []Token
	names := map[string]bool{}
	for i, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		t := Token{Name: "default"}
		switch len(f) {
		case 1:
			t.Secret = f[0]
		case 2:
			t.Name, t.Secret = f[0], f[1]
		default:
			return nil, fmt.Errorf("line %d: want NAME TOKEN or TOKEN", i+1)
		}
		if len(t.Secret) < MinTokenLength {
			return nil, fmt.Errorf("line %d: the token of %s is shorter than %d characters; use e.g. openssl rand -hex 32", i+1, t.Name, MinTokenLength)
		}
		if names[t.Name] {
			return nil, fmt.Errorf("line %d: token name %s is used twice", i+1, t.Name)
		}
		names[t.Name] = true
		out = append(out, t)
	}
	if len(out) == 0 {
		return nil, errors.New("no token in the file")
	}
	return out, nil
}

// TokenSecret is the secret a CLI sends from a token file: the first token's.
func TokenSecret(data []byte) (string, error) {
	ts, err := ParseTokens(data)
	if err != nil {
		return "", err
	}
	return ts[0].Secret, nil
}

type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func fail(w http.ResponseWriter, code int, format string, args ...any) {
	writeJSON(w, code, apiError{Error: fmt.Sprintf(format, args...)})
}

// Handler routes the API, behind authentication (see auth).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, s.Status()) })
	mux.HandleFunc("GET /v1/services", func(w http.ResponseWriter, r *http.Request) {
		if !s.gossip(w) {
			return
		}
		writeJSON(w, 200, catalog.Catalog{Services: s.Fleet.OperatorServices()})
	})
	mux.HandleFunc("POST /v1/services", s.apply)
	mux.HandleFunc("POST /v1/services/delete", s.deleteMany)
	mux.HandleFunc("DELETE /v1/services/{host}", func(w http.ResponseWriter, r *http.Request) {
		if !s.gossip(w) {
			return
		}
		host := strings.TrimSuffix(strings.ToLower(r.PathValue("host")), ".")
		if len(s.Fleet.Delete([]string{host})) == 0 {
			fail(w, http.StatusNotFound, "no operator entry for %s (discovered services cannot be deleted here; change their source)", host)
			return
		}
		s.Log.Info("operator entry deleted", append([]any{"host", host}, audit(r)...)...)
		writeJSON(w, 200, map[string]any{"deleted": host})
	})
	return s.auth(mux)
}

func (s *Server) gossip(w http.ResponseWriter) bool {
	if s.Fleet == nil {
		fail(w, http.StatusConflict, "gossip is off on this instance (peers.bind is empty), so there is no fleet store; set peers.bind and peers.keyring, or put services in a catalog file")
		return false
	}
	return true
}

func (s *Server) apply(w http.ResponseWriter, r *http.Request) {
	if !s.gossip(w) {
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBody))
	if err != nil {
		fail(w, http.StatusRequestEntityTooLarge, "request body: %v (limit %d bytes)", err, MaxBody)
		return
	}
	name := r.URL.Query().Get("file")
	if name == "" {
		name = "request"
	}
	c, err := catalog.Parse(name, body, s.Catalog)
	if err != nil {
		fail(w, http.StatusBadRequest, "%v", err)
		return
	}
	if len(c.Services) == 0 {
		fail(w, http.StatusBadRequest, "%s: no services: the document needs services: [{host, ports, identities}, ...]", name)
		return
	}
	n, err := s.Fleet.Apply(c.Services)
	if err != nil {
		fail(w, http.StatusBadRequest, "%v", err)
		return
	}
	hosts := make([]string, len(c.Services))
	for i, sv := range c.Services {
		hosts[i] = sv.Host
	}
	s.Log.Info("operator entries applied", append([]any{"services", len(c.Services), "hosts", strings.Join(hosts, ","), "changed", n}, audit(r)...)...)
	writeJSON(w, 200, map[string]any{"applied": hosts, "changed": n})
}

// deleteMany deletes many operator entries in one request, so undoing a large apply is one
// change to the store rather than one request (and one rebuild) per entry.
func (s *Server) deleteMany(w http.ResponseWriter, r *http.Request) {
	if !s.gossip(w) {
		return
	}
	var req DeleteRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		fail(w, http.StatusBadRequest, "request body: %v; send {\"hosts\": [HOST, ...]} or {\"allApplied\": true}", err)
		return
	}
	switch {
	case req.AllApplied && len(req.Hosts) > 0:
		fail(w, http.StatusBadRequest, "give hosts or allApplied, not both")
		return
	case req.AllApplied:
		for _, sv := range s.Fleet.OperatorServices() {
			req.Hosts = append(req.Hosts, sv.Host)
		}
	case len(req.Hosts) == 0:
		fail(w, http.StatusBadRequest, "no hosts: send {\"hosts\": [HOST, ...]} or {\"allApplied\": true}")
		return
	}
	want := make([]string, 0, len(req.Hosts))
	seen := map[string]bool{}
	for _, h := range req.Hosts {
		h = strings.TrimSuffix(strings.ToLower(h), ".")
		if !seen[h] {
			seen[h] = true
			want = append(want, h)
		}
	}
	res := DeleteResult{Deleted: s.Fleet.Delete(want)}
	gone := map[string]bool{}
	for _, h := range res.Deleted {
		gone[h] = true
	}
	for _, h := range want {
		if !gone[h] {
			res.Missing = append(res.Missing, h)
		}
	}
	if res.Deleted == nil {
		res.Deleted = []string{}
	}
	s.Log.Info("operator entries deleted", append([]any{"deleted", len(res.Deleted), "hosts", strings.Join(res.Deleted, ","), "missing", len(res.Missing), "all_applied", req.AllApplied}, audit(r)...)...)
	writeJSON(w, 200, res)
}

type ctxKey int

const (
	socketKey ctxKey = iota
	principalKey
)

// socketPeer is what ServeSocket learnt of a connection.
type socketPeer struct {
	cred  localsock.Cred
	known bool
	err   error
}

// caller is who made a request, once authenticated.
type caller struct {
	principal string // "alice (uid 1000)", "token ci", "cert spiffe://..."
	via       string // "unix socket pid 4711", "tcp 10.0.0.5:40112"
}

// audit is the request's principal and transport, for the audit log.
func audit(r *http.Request) []any {
	c, _ := r.Context().Value(principalKey).(caller)
	return []any{"principal", c.principal, "via", c.via}
}

// auth lets a request through once its caller is authenticated, recording who it is.
func (s *Server) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, code, why := s.authenticate(r)
		if code != 0 {
			reason := "forbidden"
			if code == http.StatusUnauthorized {
				reason = "unauthorized"
			}
			s.refuse(reason, "admin API request refused", "method", r.Method, "path", r.URL.Path, "caller", c.principal, "via", c.via, "reason", why)
			if code == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="fwdproxy"`)
			}
			fail(w, code, "%s", why)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey, c)))
	})
}

// authenticate names the caller, or says why it is refused (an HTTP status and a message).
func (s *Server) authenticate(r *http.Request) (caller, int, string) {
	if sp, ok := r.Context().Value(socketKey).(socketPeer); ok {
		c := caller{principal: "local user", via: "unix socket"}
		switch {
		case sp.err != nil:
			return c, http.StatusForbidden, "cannot read the caller's credentials: " + sp.err.Error()
		case !sp.known: // no peer credentials on this platform: the socket's mode admitted it
			return c, 0, ""
		}
		c.principal = sp.cred.Principal() + " (uid " + fmt.Sprint(sp.cred.UID) + ")"
		if sp.cred.PID > 0 {
			c.via += fmt.Sprintf(" pid %d", sp.cred.PID)
		}
		if err := s.Local.Allows(sp.cred); err != nil {
			return c, http.StatusForbidden, "permission denied: " + err.Error()
		}
		return c, 0, ""
	}
	c := caller{principal: "anonymous", via: "tcp " + r.RemoteAddr}
	var parts []string
	tlsAuth := r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.PeerCertificates) > 0
	if tlsAuth {
		parts = append(parts, "cert "+tlsfiles.Identity(r.TLS.PeerCertificates[0]))
	}
	if len(s.Tokens) > 0 {
		name := s.token(r.Header.Get("Authorization"))
		if name == "" {
			c.principal = strings.Join(append(parts, "no valid token"), ", ")
			return c, http.StatusUnauthorized, "missing or wrong bearer token (see admin.tokenFile; fwdproxy CLI: --token-file)"
		}
		parts = append(parts, "token "+name)
	}
	if len(parts) == 0 {
		return c, http.StatusUnauthorized, "this TCP listener authenticates no one (neither admin.tokenFile nor admin.tls with client certificates); use the Unix socket admin.socket"
	}
	c.principal = strings.Join(parts, ", ")
	return c, 0, ""
}

// token names the token an Authorization header carries, or "". Every token is compared, in
// constant time, so the time taken says nothing about which one nearly matched.
func (s *Server) token(header string) string {
	got := []byte(header)
	found := ""
	for _, t := range s.Tokens {
		if subtle.ConstantTimeCompare(got, []byte("Bearer "+t.Secret)) == 1 {
			found = t.Name
		}
	}
	return found
}

// ServeSocket serves on a Unix socket listener (see localsock.Listen) until ctx ends; each
// caller is authenticated by its peer credentials against s.Local.
func (s *Server) ServeSocket(ctx context.Context, lis net.Listener) error {
	return s.serve(ctx, lis, func(ctx context.Context, c net.Conn) context.Context {
		cred, err := localsock.PeerCred(c)
		sp := socketPeer{cred: cred, known: err == nil}
		if err != nil && !errors.Is(err, localsock.ErrUnsupported) {
			sp.err = err
		}
		return context.WithValue(ctx, socketKey, sp)
	})
}

// Serve serves TCP callers on lis (a TLS listener with admin.tls) until ctx ends; each is
// authenticated by its token and/or client certificate.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	return s.serve(ctx, lis, nil)
}

func (s *Server) serve(ctx context.Context, lis net.Listener, connContext func(context.Context, net.Conn) context.Context) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, ConnContext: connContext,
		ErrorLog: log.New(serverLog{s}, "", 0)}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shut)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

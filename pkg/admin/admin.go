// Package admin is the daemon's fleet admin API (JSON over HTTP) and its client, used by
// fwdproxy apply, delete and status. It listens on loopback by default; elsewhere it requires a
// bearer token or client certificates (see config.Admin).
//
//	GET    /v1/status            this instance, the members and their digests, identity expiry
//	GET    /v1/services          the operator entries
//	POST   /v1/services          upsert the services of a catalog document (YAML or JSON)
//	DELETE /v1/services/{host}   delete an operator entry
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

	"github.com/fwdproxy/fwdproxy/internal/ratelog"
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
	// ConfigVersion is the content hash of the xDS snapshot this instance serves.
	ConfigVersion string    `json:"configVersion,omitempty"`
	Ready         bool      `json:"ready"`
	ReadyReason   string    `json:"readyReason"`
	Identity      *Identity `json:"identity,omitempty"`
}

// Identity is the fleet certificate as this instance holds it (never the key).
type Identity struct {
	SPIFFEID string    `json:"spiffeID"`
	NotAfter time.Time `json:"notAfter"`
}

// Server serves the admin API.
type Server struct {
	// Fleet is nil when gossip is off: apply and delete then answer 409 with the fix.
	Fleet   Fleet
	Status  func() Status
	Token   string
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

// Handler routes the API, behind the token check when a token is set.
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
	mux.HandleFunc("DELETE /v1/services/{host}", func(w http.ResponseWriter, r *http.Request) {
		if !s.gossip(w) {
			return
		}
		host := strings.TrimSuffix(strings.ToLower(r.PathValue("host")), ".")
		if len(s.Fleet.Delete([]string{host})) == 0 {
			fail(w, http.StatusNotFound, "no operator entry for %s (discovered services cannot be deleted here; change their source)", host)
			return
		}
		s.Log.Info("operator entry deleted", "host", host, "client", r.RemoteAddr)
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
	s.Log.Info("operator entries applied", "services", len(c.Services), "changed", n, "client", r.RemoteAddr)
	writeJSON(w, 200, map[string]any{"applied": hosts, "changed": n})
}

func (s *Server) auth(next http.Handler) http.Handler {
	if s.Token == "" {
		return next
	}
	want := []byte("Bearer " + s.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if subtle.ConstantTimeCompare(got, want) != 1 {
			s.refuse("unauthorized", "admin request refused: missing or wrong bearer token", "client", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
			w.Header().Set("WWW-Authenticate", `Bearer realm="fwdproxy"`)
			fail(w, http.StatusUnauthorized, "missing or wrong bearer token (see admin.tokenFile; fwdproxy CLI: --token-file)")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Serve serves on lis until ctx ends.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute,
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

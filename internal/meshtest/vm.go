package meshtest

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// VMBackend stands in for a service on a legacy VM, behind the fleet in the reverse direction:
// plain HTTP answering every request with a VMReport (what reached the VM), or plain TCP writing
// "vm NAME\n" and then echoing. /healthz answers 200 without counting as a request.
type VMBackend struct {
	Name string
	Addr string
	// Requests counts the requests (HTTP) or connections (TCP) served, health checks aside.
	Requests atomic.Int64
	ln       net.Listener
	srv      *http.Server
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	stopped  atomic.Bool
	// sick makes /healthz answer 503 while requests are still served.
	sick atomic.Bool
}

// SetHealthy makes the HTTP backend's /healthz answer 200 (true) or 503 (false).
func (v *VMBackend) SetHealthy(ok bool) { v.sick.Store(!ok) }

// VMReport is what an HTTP VM backend saw of a request.
type VMReport struct {
	Backend string   `json:"backend"`
	Host    string   `json:"host"`
	Path    string   `json:"path"`
	XFCC    []string `json:"xfcc"`
	// Headers are the request's headers, canonical names.
	Headers http.Header `json:"headers"`
}

// StartVMHTTP starts an HTTP VM backend on a free loopback port.
func StartVMHTTP(name string) (*VMBackend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	v := &VMBackend{Name: name, Addr: ln.Addr().String(), ln: ln}
	v.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			if v.sick.Load() {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			w.WriteHeader(http.StatusOK)
			return
		}
		v.Requests.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(VMReport{Backend: name, Host: r.Host, Path: r.URL.Path, XFCC: r.Header.Values("X-Forwarded-Client-Cert"), Headers: r.Header})
	})}
	go func() { _ = v.srv.Serve(ln) }()
	return v, nil
}

// StartVMTCP starts a TCP VM backend on a free loopback port: it writes "vm NAME\n" first
// (a server-first protocol), then echoes.
func StartVMTCP(name string) (*VMBackend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	v := &VMBackend{Name: name, Addr: ln.Addr().String(), ln: ln, conns: map[net.Conn]struct{}{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			v.mu.Lock()
			if v.stopped.Load() {
				v.mu.Unlock()
				c.Close()
				return
			}
			v.conns[c] = struct{}{}
			v.mu.Unlock()
			go func() {
				defer func() {
					v.mu.Lock()
					delete(v.conns, c)
					v.mu.Unlock()
					c.Close()
				}()
				v.Requests.Add(1)
				if _, err := io.WriteString(c, "vm "+name+"\n"); err != nil {
					return
				}
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return v, nil
}

// Stop kills the backend: the port closes and every open connection is cut.
func (v *VMBackend) Stop() {
	if v.stopped.Swap(true) {
		return
	}
	v.ln.Close()
	if v.srv != nil {
		_ = v.srv.Close()
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for c := range v.conns {
		c.Close()
	}
}

// ReadVMGreeting reads a TCP VM backend's first line, "vm NAME", and returns NAME.
func ReadVMGreeting(r *bufio.Reader) (string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	if len(line) < 4 || line[:3] != "vm " {
		return "", errors.New("not a VM greeting: " + line)
	}
	return line[3 : len(line)-1], nil
}

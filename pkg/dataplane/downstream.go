package dataplane

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
)

// Faults of the downstream client are the client's: a request body that cannot be read (bad
// chunked encoding, a body shorter than its Content-Length when the client goes away, an HTTP/2
// stream the client reset) fails the request without counting against the gateway, as in Envoy,
// where a downstream protocol error or disconnect resets the upstream request and reports
// nothing to outlier detection. Counting it would let one broken legacy client eject every
// gateway, up to max_ejection_percent.

// Downstream error reasons, the values of the reason label of
// fwdproxy_dataplane_downstream_errors_total.
const (
	downBadRequest      = "bad_request"       // malformed body: 400
	downClientClosed    = "client_closed"     // the client went away mid-request
	downHeadersTooLarge = "headers_too_large" // max_request_headers_kb: 431
	downTooManyHeaders  = "too_many_headers"  // max_headers_count: 431
	downClientStalled   = "client_stalled"    // TCP: the client stopped reading
)

// downstreamBody records why reading a request body failed.
type downstreamBody struct {
	io.ReadCloser
	mu  sync.Mutex
	err error
}

func (b *downstreamBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		b.mu.Lock()
		if b.err == nil {
			b.err = err
		}
		b.mu.Unlock()
	}
	return n, err
}

// failure is the first error reading the body, or nil.
func (b *downstreamBody) failure() error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// downstreamError is a request that failed because of its client.
type downstreamError struct{ err error }

func (e *downstreamError) Error() string {
	return "reading the request from the client: " + e.err.Error()
}
func (e *downstreamError) Unwrap() error { return e.err }

// reason tells a client that went away from one that sent something malformed.
func (e *downstreamError) reason() string {
	if clientGone(e.err) {
		return downClientClosed
	}
	return downBadRequest
}

// clientGone reports whether err means the client's connection or stream ended, rather than that
// it sent something malformed (Go's chunked reader: "malformed chunked encoding", "invalid byte
// in chunk length", ...).
func clientGone(err error) bool {
	var ne net.Error
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, context.Canceled), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.As(err, &ne):
		return true
	}
	// HTTP/2: the client reset its stream or closed the connection.
	msg := err.Error()
	return strings.Contains(msg, "client disconnected") || strings.Contains(msg, "stream closed") || strings.Contains(msg, "stream error")
}

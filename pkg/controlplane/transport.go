package controlplane

import (
	"context"
	"crypto/tls"
	"errors"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/test/bufconn"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/internal/tlsfiles"
)

// Transport says how an xDS client reached the server. SDS hands out the fleet's private key,
// so every transport authenticates its callers: in process (only the daemon's own code holds
// the listener), a Unix socket (the socket file's mode and the peer's credentials) or TCP with
// client certificates.
type Transport string

// The transports.
const (
	InProcess  Transport = "in-process"
	UnixSocket Transport = "unix"
	TCP        Transport = "tcp"
)

// Peer is what the server knows of an xDS client's connection.
type Peer struct {
	// Transport is empty for a connection of a gRPC server the Server did not set up (Register).
	Transport Transport
	// Cred is a Unix socket peer's credentials; CredKnown is false where the platform reports
	// none (the socket file's mode alone admitted it).
	Cred      localsock.Cred
	CredKnown bool
	// Identity is a TCP client's certificate identity (URI SAN, else subject).
	Identity string
	Addr     string
}

// String names the peer in logs.
func (p Peer) String() string {
	switch {
	case p.Transport == UnixSocket && p.CredKnown:
		return "unix " + p.Cred.String()
	case p.Transport == TCP:
		return "tcp " + p.Addr + " " + p.Identity
	case p.Transport == "":
		return p.Addr
	}
	return string(p.Transport)
}

// Client is an xDS client as the server sees it: its connection and the node ID it sent.
type Client struct {
	Node string
	Peer Peer
}

type authInfo struct {
	credentials.CommonAuthInfo
	peer Peer
}

func (a authInfo) AuthType() string { return "fwdproxy-" + string(a.peer.Transport) }

// localCreds are the transport credentials of the in-process and Unix socket servers: no
// encryption (the kernel carries the bytes), and the peer as its listener authenticated it.
type localCreds struct{ transport Transport }

func (c localCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	p := Peer{Transport: c.transport}
	if lc, ok := conn.(*localsock.Conn); ok {
		p.Cred, p.CredKnown = lc.Cred, lc.Known
	} else if c.transport == UnixSocket {
		return nil, nil, errors.New("unix socket connection not accepted through the peer-credential guard")
	}
	return conn, authInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}, peer: p}, nil
}

func (c localCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("server-side credentials")
}

func (c localCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "fwdproxy-" + string(c.transport)}
}

func (c localCreds) Clone() credentials.TransportCredentials { return c }

func (c localCreds) OverrideServerName(string) error { return nil }

// peerOf reads the peer of a stream's context.
func peerOf(ctx context.Context) Peer {
	pr, ok := peer.FromContext(ctx)
	if !ok {
		return Peer{}
	}
	addr := ""
	if pr.Addr != nil {
		addr = pr.Addr.String()
	}
	switch ai := pr.AuthInfo.(type) {
	case authInfo:
		p := ai.peer
		p.Addr = addr
		return p
	case credentials.TLSInfo:
		p := Peer{Transport: TCP, Addr: addr}
		if certs := ai.State.PeerCertificates; len(certs) > 0 {
			p.Identity = tlsfiles.Identity(certs[0])
		}
		return p
	}
	return Peer{Addr: addr}
}

// InProcessListener is a listener only this process can connect to, for the built-in data
// plane running in the daemon: its bytes never leave the process.
type InProcessListener struct{ l *bufconn.Listener }

// NewInProcessListener makes one.
func NewInProcessListener() *InProcessListener { return &InProcessListener{l: bufconn.Listen(1 << 20)} }

// Dial connects to it (a gRPC context dialer).
func (p *InProcessListener) Dial(ctx context.Context, _ string) (net.Conn, error) {
	return p.l.DialContext(ctx)
}

// tlsCreds checks the configuration before handing it to gRPC: the TCP server must require
// and verify client certificates.
func tlsCreds(cfg *tls.Config) (credentials.TransportCredentials, error) {
	if cfg == nil || cfg.ClientAuth != tls.RequireAndVerifyClientCert || cfg.ClientCAs == nil {
		return nil, errors.New("the TCP xDS server must require client certificates verified against a CA (tls.RequireAndVerifyClientCert)")
	}
	return credentials.NewTLS(cfg), nil
}

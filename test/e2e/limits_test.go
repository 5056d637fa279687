//go:build linux

package e2e_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// listen.maxConnections, as both data planes enforce it from the same xDS (Envoy's
// connection_limit filter): a service port holding its limit closes the next connection before
// anything reaches the mesh, and takes one again once a connection closes.
func TestConnectionLimitBuiltin(t *testing.T) { runConnectionLimit(t, builtin) }
func TestConnectionLimitEnvoy(t *testing.T)   { runConnectionLimit(t, envoyDataplane(t)) }

func runConnectionLimit(t *testing.T, dp dataplane) {
	dp.listen = ", maxConnections: 2"
	e := start(t, goMesh, dp)
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(e.ports.tcp), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	var held []net.Conn
	for i := range 2 {
		c, r := dial()
		if rep, err := meshtest.ReadReportLine(r); err != nil || rep.Service != "mysql" {
			t.Fatalf("connection %d within the limit: %+v %v", i, rep, err)
		}
		held = append(held, c)
	}
	before, _ := e.mesh.stats("mysql")
	_, r := dial()
	if b, err := r.ReadByte(); err == nil || !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("a 3rd connection to a port limited to 2: read %q %v; want it closed", b, err)
	}
	if after, _ := e.mesh.stats("mysql"); after.Handshakes != before.Handshakes {
		t.Errorf("the refused connection reached the sidecar (%d handshakes, %d before)", after.Handshakes, before.Handshakes)
	}
	held[0].Close()
	e.eventually("a connection taken again after one closed", func() error {
		_, r := dial()
		rep, err := meshtest.ReadReportLine(r)
		if err != nil || rep.Service != "mysql" {
			return fmt.Errorf("%+v %v", rep, err)
		}
		return nil
	})
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && ne.Op == "read"
}

package peers

import (
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// faultyTransport is memberlist's own UDP/TCP transport on loopback, with two test hooks: it can
// drop all traffic to and from chosen peers (a partition), and it counts the bytes it sends.
type faultyTransport struct {
	inner   *memberlist.NetTransport
	packets chan *memberlist.Packet
	streams chan net.Conn
	done    chan struct{}
	once    sync.Once

	mu      sync.Mutex
	blocked map[string]bool // peer address host:port
	sent    atomic.Int64
}

var _ memberlist.NodeAwareTransport = (*faultyTransport)(nil)

func newFaultyTransport() (*faultyTransport, error) {
	inner, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}, BindPort: 0})
	if err != nil {
		return nil, err
	}
	t := &faultyTransport{
		inner: inner, packets: make(chan *memberlist.Packet), streams: make(chan net.Conn),
		done: make(chan struct{}), blocked: map[string]bool{},
	}
	go func() {
		for {
			select {
			case p := <-inner.PacketCh():
				if t.isBlocked(p.From.String()) {
					continue
				}
				select {
				case t.packets <- p:
				case <-t.done:
					return
				}
			case c := <-inner.StreamCh():
				select {
				case t.streams <- &countingConn{Conn: c, n: &t.sent}:
				case <-t.done:
					c.Close()
					return
				}
			case <-t.done:
				return
			}
		}
	}()
	return t, nil
}

func (t *faultyTransport) Addr() string {
	return net.JoinHostPort("127.0.0.1", itoa(t.inner.GetAutoBindPort()))
}

func itoa(i int) string { return strconv.Itoa(i) }

func (t *faultyTransport) block(addrs ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, a := range addrs {
		t.blocked[a] = true
	}
}

func (t *faultyTransport) unblockAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.blocked = map[string]bool{}
}

func (t *faultyTransport) isBlocked(addr string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.blocked[addr]
}

var errDropped = errors.New("dropped by test partition")

func (t *faultyTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return t.inner.FinalAdvertiseAddr(ip, port)
}

func (t *faultyTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (t *faultyTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if t.isBlocked(a.Addr) {
		return time.Now(), nil // silently lost, as on a real network
	}
	t.sent.Add(int64(len(b)))
	return t.inner.WriteToAddress(b, a)
}

func (t *faultyTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

func (t *faultyTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (t *faultyTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if t.isBlocked(a.Addr) {
		return nil, errDropped
	}
	c, err := t.inner.DialAddressTimeout(a, timeout)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, n: &t.sent}, nil
}

func (t *faultyTransport) StreamCh() <-chan net.Conn { return t.streams }

func (t *faultyTransport) Shutdown() error {
	t.once.Do(func() { close(t.done) })
	// Keep draining so the inner listeners can finish a pending delivery and exit.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-t.inner.PacketCh():
			case c := <-t.inner.StreamCh():
				c.Close()
			case <-stop:
				return
			}
		}
	}()
	return t.inner.Shutdown()
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Write(b []byte) (int, error) {
	k, err := c.Conn.Write(b)
	c.n.Add(int64(k))
	return k, err
}

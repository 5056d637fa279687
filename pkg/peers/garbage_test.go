package peers

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// Garbage on the gossip port, by UDP and TCP, is counted in
// fwdproxy_gossip_messages_rejected_total by reason, and logged only for the first few packets
// of each kind a minute: a scanner or a misconfigured peer sending at line rate must not flood
// the log.
func TestGarbageOnTheGossipPortIsCountedAndRateLimited(t *testing.T) {
	key := make([]byte, 32)
	for _, c := range []struct {
		name   string
		keys   [][]byte
		reason string
	}{
		{"encrypted fleet", [][]byte{key}, "encryption"},
		{"unencrypted fleet", nil, "malformed"},
	} {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			p := startPeer(t, "peer-00", peerOpts{keys: c.keys})
			counted := func() float64 { return testutil.ToFloat64(p.metrics.rejected.WithLabelValues(c.reason)) }
			const packets, streams = 400, 20
			u, err := net.Dial("udp", p.tr.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			for i := range packets {
				// 0xEE is no memberlist message type and no valid ciphertext.
				if _, err := u.Write([]byte(fmt.Sprintf("\xee garbage %d", i))); err != nil {
					t.Fatal(err)
				}
				if i%50 == 49 {
					time.Sleep(5 * time.Millisecond) // let the receiver keep up: UDP may drop
				}
			}
			for i := range streams {
				s, err := net.Dial("tcp", p.tr.Addr())
				if err != nil {
					t.Fatal(err)
				}
				_, _ = fmt.Fprintf(s, "\xee garbage stream %d", i)
				s.Close()
			}
			// Nearly every packet arrives on loopback; every one that does is counted.
			meshtest.Eventually(t, 10*time.Second, "the garbage counted", func() bool { return counted() >= 0.9*(packets+streams) })
			lines := 0
			for _, l := range strings.Split(p.log.String(), "\n") {
				if strings.Contains(l, "level=ERROR") || strings.Contains(l, "level=WARN") {
					lines++
				}
			}
			if lines > 25 {
				t.Errorf("%v garbage messages logged %d lines; want a few per kind and minute:\n%s", counted(), lines, p.log.String()[:min(4000, len(p.log.String()))])
			}
			if !strings.Contains(p.log.String(), "gossip") {
				t.Errorf("nothing logged about the garbage:\n%s", p.log.String())
			}
		})
	}
}

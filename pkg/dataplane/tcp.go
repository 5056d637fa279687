package dataplane

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// serveTCP proxies one downstream connection to the listener's cluster (the peer address was
// admitted by the chain's source ranges at accept): connect (with one retry elsewhere on
// connection failure), then bytes both ways with half-close and an idle timeout.
func (l *listenerRT) serveTCP(down *trackedConn, cfg *listenerConfig) {
	defer down.Close()
	start := time.Now()
	tc := cfg.tcp
	flags, upstream := "-", ""
	var rx, tx int64
	defer func() {
		if len(tc.logs) > 0 {
			line := tcpLogLine(start, flags, rx, tx, upstream, tc.cluster)
			for _, lg := range tc.logs {
				lg.write(line)
			}
		}
	}()
	c := l.dp.cluster(tc.cluster)
	if c == nil {
		l.dp.metrics.upstreamErrs.WithLabelValues(tc.cluster, reasonNoHealthy).Inc()
		flags = "NC"
		return
	}
	up, h, err := c.connect(context.Background(), tc.connectAttempts)
	if err != nil {
		flags = "UF"
		var ue *upstreamError
		if errors.As(err, &ue) && ue.reason == reasonNoHealthy {
			flags = "UH"
		}
		if h != nil {
			upstream = h.addr
		}
		l.dp.log.Debug("upstream connection failed", "listener", cfg.name, "cluster", tc.cluster, "error", err)
		return
	}
	defer up.Close()
	upstream = h.addr
	var fault pipeFault
	rx, tx, fault = pipe(down, up, tc.idleTimeout)
	switch fault {
	case faultUpstream:
		// Counted, but not fed to outlier detection: Envoy's tcp_proxy reports only connect
		// failures to it, since a connection's bytes say nothing of the gateway's health.
		flags = "UC"
		l.dp.metrics.upstreamErrs.WithLabelValues(tc.cluster, reasonReset).Inc()
	case faultClientStalled:
		// The upstream gave up on a client that stopped reading what it was sent.
		flags = "UC"
		l.dp.metrics.downstreamErrs.WithLabelValues(cfg.name, downClientStalled).Inc()
	}
}

// pipeFault says which side ended a proxied connection with an error.
type pipeFault int

const (
	faultNone pipeFault = iota
	// faultUpstream: the upstream reset or failed while the client was taking its bytes.
	faultUpstream
	// faultClientStalled: the upstream failed while a write to the client was blocked, that is
	// the client had stopped reading; the upstream giving up on it is the client's doing.
	faultClientStalled
)

// pipe copies both ways until both sides finished. An EOF from one side half-closes the other;
// an error closes both. It reports the bytes from downstream (rx) and to it (tx), and which side
// failed, if one did.
func pipe(down, up net.Conn, idle time.Duration) (rx, tx int64, fault pipeFault) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var closeOnce sync.Once
	closeBoth := func() {
		closeOnce.Do(func() {
			down.Close()
			up.Close()
		})
	}
	var timer *time.Timer
	if idle > 0 {
		check := func() {
			since := time.Since(time.Unix(0, last.Load()))
			if since >= idle {
				closeBoth()
				return
			}
			timer.Reset(idle - since)
		}
		timer = time.AfterFunc(idle, check)
		defer timer.Stop()
	}
	var wg sync.WaitGroup
	var upFail atomic.Bool
	// writingDown is set while a write to the client is in progress; a write that does not
	// return is a client that does not read (its window and our buffers are full).
	var writingDown, stalled atomic.Bool
	upstreamFailed := func() {
		if writingDown.Load() {
			stalled.Store(true)
		}
		upFail.Store(true)
	}
	copyHalf := func(dst, src net.Conn, n *int64, srcIsUp bool) {
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		buf := *bp
		for {
			nr, rerr := src.Read(buf)
			if nr > 0 {
				last.Store(time.Now().UnixNano())
				if srcIsUp {
					writingDown.Store(true)
				}
				nw, werr := dst.Write(buf[:nr])
				if srcIsUp {
					writingDown.Store(false)
				}
				*n += int64(nw)
				if werr != nil {
					if !srcIsUp {
						upstreamFailed()
					}
					closeBoth()
					return
				}
			}
			if rerr != nil {
				if errors.Is(rerr, io.EOF) {
					if cw, ok := dst.(interface{ CloseWrite() error }); ok {
						_ = cw.CloseWrite()
					}
					return
				}
				if srcIsUp && !errors.Is(rerr, net.ErrClosed) {
					upstreamFailed()
				}
				closeBoth()
				return
			}
		}
	}
	wg.Add(2)
	go copyHalf(up, down, &rx, false)
	go copyHalf(down, up, &tx, true)
	wg.Wait()
	switch {
	case stalled.Load():
		return rx, tx, faultClientStalled
	case upFail.Load():
		return rx, tx, faultUpstream
	}
	return rx, tx, faultNone
}

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

// serveTCP proxies one downstream connection to the listener's cluster: network RBAC on the
// peer address, connect (with one retry elsewhere on connection failure), then bytes both
// ways with half-close and an idle timeout.
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
	if !cfg.netRBAC.allowed(peerAddr(down)) {
		l.dp.metrics.rbacDenied.WithLabelValues(cfg.name).Inc()
		flags = "RBAC"
		l.dp.log.Debug("connection denied by RBAC", "listener", cfg.name, "peer", down.RemoteAddr().String())
		return
	}
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
	var upErr bool
	rx, tx, upErr = pipe(down, up, tc.idleTimeout)
	if upErr {
		flags = "UC"
		c.failed(h, reasonReset)
	}
}

// pipe copies both ways until both sides finished. An EOF from one side half-closes the other;
// an error closes both. It reports the bytes from downstream (rx) and to it (tx), and whether
// the upstream side failed.
func pipe(down, up net.Conn, idle time.Duration) (rx, tx int64, upstreamFailed bool) {
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
		var check func()
		check = func() {
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
	copyHalf := func(dst, src net.Conn, n *int64, srcIsUp bool) {
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		buf := *bp
		for {
			nr, rerr := src.Read(buf)
			if nr > 0 {
				last.Store(time.Now().UnixNano())
				nw, werr := dst.Write(buf[:nr])
				*n += int64(nw)
				if werr != nil {
					if !srcIsUp {
						upFail.Store(true)
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
					upFail.Store(true)
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
	return rx, tx, upFail.Load()
}

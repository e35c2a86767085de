package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/tether-net/tether/tunnel"
)

// The pooled data path (tunnel/SPEC.md, "Data connections"): once a
// tunnel's control channel is up, the agent asks its PS for a pool
// (PoolJoin) and, on a grant, keeps min(--pool-size, grant size) idle data
// connections dialed to the PS's pool listener. Each one waits for the PS
// to pair it with a client connection; the agent then serves it exactly
// as a tunnel stream (same target check, dial, status codes, logs and
// metrics) and dials a replacement at once, so the pool stays full ahead
// of demand. The pool belongs to one tunnel session and dies with it.

// Timing of the pool.
const (
	// joinWait bounds the wait for the control channel and the PS's
	// answer to PoolJoin. A PS that predates the control channel never
	// opens it: the tunnel then simply runs without a pool.
	joinWait = 10 * time.Second
	// minIdleLife: a data connection that the PS closes sooner than this
	// without pairing it counts as a failed dial for the backoff, so a PS
	// that drops every connection at once is not redialed in a tight loop.
	minIdleLife = time.Second
)

// pool keeps the data connections of one tunnel session.
type pool struct {
	a    *Agent
	t    *tracked
	log  *slog.Logger
	size int

	ctx    context.Context // ends when the pool closes
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	idle   map[*tunnel.DataConn]struct{} // waiting for a client
	busy   map[io.Closer]struct{}        // paired: being answered or carrying a client

	workers  sync.WaitGroup
	failures logEvery
}

// startPool joins t's session to its PS's pool in the background and
// returns at once; the pool closes when the session ends or close is
// called. With --pool-size 0 it does nothing.
func (a *Agent) startPool(t *tracked, log *slog.Logger) *pool {
	ctx, cancel := context.WithCancel(context.Background())
	p := &pool{a: a, t: t, log: log, ctx: ctx, cancel: cancel,
		idle: map[*tunnel.DataConn]struct{}{}, busy: map[io.Closer]struct{}{},
		failures: logEvery{every: dialFailureEvery}}
	if a.cfg.PoolSize == 0 {
		p.close()
		return p
	}
	go func() {
		select {
		case <-t.sess.Done():
			p.close()
		case <-ctx.Done():
		}
	}()
	go p.join()
	return p
}

// join asks the PS for a pool and starts one worker per idle slot.
func (p *pool) join() {
	ctx, cancel := context.WithTimeout(p.ctx, joinWait)
	defer cancel()
	c := p.t.sess.WaitControl(ctx)
	if c == nil {
		if p.ctx.Err() == nil {
			p.log.Debug("no control channel on this tunnel: no data connection pool")
		}
		return
	}
	g, err := c.JoinPool(ctx)
	switch {
	case errors.Is(err, tunnel.ErrNoPool):
		p.log.Info("the ps offers no data connection pool: using the tunnel's streams only", "err", err)
		return
	case err != nil:
		if p.ctx.Err() == nil {
			p.log.Warn("joining the ps's data connection pool failed: using the tunnel's streams only", "err", err)
		}
		return
	}
	p.size = min(p.a.cfg.PoolSize, int(g.Size))
	p.log.Info("joined the ps's data connection pool", "pool_addr", g.Addr.String(), "size", p.size,
		"ps_size", g.Size, "tls", p.t.sess.TLSConfig() != nil)
	cfg := tunnel.ClientConfig{TLS: p.t.sess.TLSConfig(), Timeout: p.a.cfg.ConnectTimeout}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	for range p.size {
		p.workers.Add(1)
		go func() {
			defer p.workers.Done()
			p.keepOne(g, cfg)
		}()
	}
}

// keepOne keeps one idle data connection: it dials, waits for the PS to
// pair it, hands the paired connection over to be served, and dials the
// next one at once. It returns when the pool closes, or stops the whole
// pool when the PS refuses a data connection (pool_refused: the session
// is unknown to the PS, or its pool is full).
func (p *pool) keepOne(g *tunnel.PoolGrant, cfg tunnel.ClientConfig) {
	bo := newBackoff(p.a.cfg.BackoffMin, p.a.cfg.BackoffMax)
	for p.ctx.Err() == nil {
		dc, err := tunnel.DialData(p.ctx, g.Addr, g.Key, cfg)
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			var se *tunnel.StreamError
			if errors.As(err, &se) && se.Code == tunnel.StreamPoolRefused {
				p.a.m.poolDials.WithLabelValues("refused").Inc()
				if p.stop() {
					p.log.Warn("the ps refused a data connection: closing this tunnel's pool, the tunnel's streams carry every client",
						"pool_addr", g.Addr.String(), "reason", se.Message)
				}
				return
			}
			p.a.m.poolDials.WithLabelValues("failed").Inc()
			wait := bo.next()
			p.failures.log(p.log, "cannot dial a data connection to the ps; retrying",
				"pool_addr", g.Addr.String(), "err", err, "retry_in", wait.Round(time.Millisecond))
			p.sleep(wait)
			continue
		}
		p.a.m.poolDials.WithLabelValues("ok").Inc()
		if !p.addIdle(dc) {
			_ = dc.Close()
			return
		}
		since := time.Now()
		h, err := dc.ReadHeader()
		if errors.Is(err, tunnel.ErrDataIdleEnded) {
			p.dropIdle(dc)
			_ = dc.Close()
			if p.ctx.Err() != nil {
				return
			}
			p.log.Debug("idle data connection ended; dialing another", "err", err, "idle_for", time.Since(since).Round(time.Millisecond))
			if time.Since(since) < minIdleLife {
				p.sleep(bo.next())
			} else {
				bo.reset()
			}
			continue
		}
		// Paired with a client (or bad input where a header belongs, which
		// is answered bad_header like a stream's).
		if !p.pair(dc) {
			_ = dc.Close() // the pool closed under the header: its session is gone
			return
		}
		bo.reset()
		p.t.lastStream.Store(time.Now().UnixNano())
		p.t.inflight.Add(1)
		go func() {
			defer p.t.inflight.Add(-1)
			defer p.done(dc)
			p.a.serveData(p.t, dc, h, err, p.log)
		}()
	}
}

// addIdle records dc as idle; false when the pool closed meanwhile.
func (p *pool) addIdle(dc *tunnel.DataConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.idle[dc] = struct{}{}
	p.a.m.poolIdle.Inc()
	return true
}

// pair moves dc out of the idle set into the busy set, where close still
// reaches it while it carries a client. It returns false when the pool
// has closed: dc is then not tracked.
func (p *pool) pair(dc *tunnel.DataConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dropIdleLocked(dc)
	if p.closed {
		return false
	}
	p.busy[dc] = struct{}{}
	return true
}

// dropIdle forgets an idle data connection that ended.
func (p *pool) dropIdle(dc *tunnel.DataConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dropIdleLocked(dc)
}

func (p *pool) dropIdleLocked(dc *tunnel.DataConn) {
	if _, ok := p.idle[dc]; ok {
		delete(p.idle, dc)
		p.a.m.poolIdle.Dec()
	}
}

// done forgets a paired data connection once it was served.
func (p *pool) done(dc *tunnel.DataConn) {
	p.mu.Lock()
	delete(p.busy, dc)
	p.mu.Unlock()
}

// sleep waits d or until the pool closes.
func (p *pool) sleep(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-p.ctx.Done():
	}
}

// stop closes the idle data connections and stops refilling; paired ones
// finish (a drain waits for them). It reports whether this call stopped
// the pool.
func (p *pool) stop() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.closed = true
	p.cancel()
	for dc := range p.idle {
		_ = dc.Close()
		p.dropIdleLocked(dc)
	}
	return true
}

// close stops the pool and also cuts the connections carrying clients:
// the tunnel session is gone, and with it every client it carried (the
// PS closes its ends of the data connections then too).
func (p *pool) close() {
	p.stop()
	p.mu.Lock()
	for c := range p.busy {
		_ = c.Close()
	}
	clear(p.busy)
	p.mu.Unlock()
}

// logEvery logs a repeating failure at most once per interval, with the
// number of occurrences left out since the previous line.
type logEvery struct {
	every time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (l *logEvery) log(log *slog.Logger, msg string, args ...any) {
	l.mu.Lock()
	now := time.Now()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := l.suppressed
	l.last, l.suppressed = now, 0
	l.mu.Unlock()
	log.Warn(msg, append(args, "suppressed", suppressed, "log_every", l.every)...)
}

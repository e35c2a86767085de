package ps

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/tether-net/tether/internal/relay"
	"github.com/tether-net/tether/tunnel"
)

// OpenTimeout bounds opening a stream on a tunnel for a client connection.
const OpenTimeout = 5 * time.Second

// handleConn carries a client connection that arrived on the PS address
// and port at over the tunnel of the agent that owns the pair. It is the connHandler of the PS's
// data plane.
func (p *PS) handleConn(at netip.AddrPort, c net.Conn, load connLoad) {
	src := addrPortOf(c.RemoteAddr())
	if !p.allow.Allows(src.Addr()) {
		p.m.clientsRejected.Inc()
		p.log.Debug("client outside --allow-clients", "at", at.String(), "client", src.String())
		reset(c)
		return
	}
	if reason := p.overLimit(load); reason != "" {
		// Counted, not logged: a flood of refusals must not become a
		// flood of log lines.
		p.m.connsRefused.WithLabelValues(reason).Inc()
		reset(c)
		return
	}
	p.bmu.RLock()
	b := p.bindings[at]
	p.bmu.RUnlock()
	if b == nil {
		p.m.streamErrors.WithLabelValues("no_route").Inc()
		reset(c)
		return
	}
	// Before anything reaches the agent: a connection meant for another
	// target is reset here (intent.go).
	if !p.intentAllows(at, c, b.target, src) {
		reset(c)
		return
	}
	s := b.sess.Load()
	if s == nil {
		// A fresh binding whose handshake is still finishing.
		t := time.NewTimer(p.cfg.HandshakeTimeout)
		select {
		case <-b.ready:
			s = b.sess.Load()
		case <-t.C:
		}
		t.Stop()
	}
	if s == nil {
		p.m.streamErrors.WithLabelValues("no_session").Inc()
		reset(c)
		return
	}
	p.inflight.Add(1)
	defer p.inflight.Add(-1)
	s.inflight.Add(1) // a superseded session waits for these (retire)
	defer s.inflight.Add(-1)
	p.m.streams.Inc()
	p.m.streamsOpen.Inc()
	defer p.m.streamsOpen.Dec()
	h := tunnel.StreamHeader{Target: b.target, Source: src}
	if p.carryPooled(s, h, c) {
		return
	}
	p.m.dataPath.WithLabelValues(DataPathMux).Inc()
	st, err := s.tun.Open(h, OpenTimeout)
	if err != nil {
		p.m.streamErrors.WithLabelValues("open_failed").Inc()
		s.log.Debug("open stream failed", "target", b.target.String(), "client", src.String(), "err", err)
		reset(c)
		return
	}
	_, _, err = relay.JoinWith(relay.HalfClose(c), st, relay.Options{
		AToB: p.m.bytesToAgent, BToA: p.m.bytesFromAgent, IdleTimeout: p.cfg.IdleTimeout,
	})
	var se *tunnel.StreamError
	switch {
	case errors.Is(err, relay.ErrIdle):
		p.m.idleClosed.Inc()
	case errors.As(err, &se):
		p.m.streamErrors.WithLabelValues(se.Code.String()).Inc()
		s.log.Debug("agent refused stream", "target", b.target.String(), "client", src.String(), "code", se.Code.String(), "reason", se.Message)
	}
}

// carryPooled carries c over an idle data connection of s's pool when
// there is one (with --data-path pool, after waiting up to --pool-wait for
// one), and reports whether it did; false means the tunnel's stream is to
// be used. The agent's status is read before any client byte is sent, so
// a data connection that turns out dead (a stale idle one, an agent that
// restarted) is dropped and the next one tried, and the client never sees
// it; a refusal (not_exposed, dial_refused, ...) is the client's answer,
// as on the stream.
func (p *PS) carryPooled(s *psSession, h tunnel.StreamHeader, c net.Conn) bool {
	sp := p.pools.of(s)
	if sp == nil {
		return false
	}
	var wait time.Duration
	if p.cfg.DataPath == DataPathPool {
		wait = p.cfg.PoolWait
	}
	for {
		dc := sp.take(wait)
		if dc == nil {
			return false
		}
		// The agent answers after its dial of the target, which its own
		// --dial-timeout bounds: wait as long as the stream path does. A
		// dead connection fails at once (RST, EOF, or its session's end
		// closing it), never by this timeout.
		err := tunnel.OpenData(dc.conn, h, tunnel.StatusTimeout)
		var se *tunnel.StreamError
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			// Alive but silent: retrying would dial the target again.
			p.m.dataPath.WithLabelValues(DataPathPool).Inc()
			p.m.streamErrors.WithLabelValues("open_failed").Inc()
			s.log.Debug("pooled data connection: no status in time", "target", h.Target.String(), "timeout", tunnel.StatusTimeout)
			_ = dc.raw.Close()
			reset(c)
			return true
		case err == nil:
			p.m.dataPath.WithLabelValues(DataPathPool).Inc()
			_, _, err = relay.Splice(c, dc.conn, relay.Options{
				AToB: p.m.bytesToAgent, BToA: p.m.bytesFromAgent, IdleTimeout: p.cfg.IdleTimeout,
			})
			if errors.Is(err, relay.ErrIdle) {
				p.m.idleClosed.Inc()
			}
			return true
		case errors.As(err, &se):
			p.m.dataPath.WithLabelValues(DataPathPool).Inc()
			p.m.streamErrors.WithLabelValues(se.Code.String()).Inc()
			s.log.Debug("agent refused pooled connection", "target", h.Target.String(), "client", h.Source.String(), "code", se.Code.String(), "reason", se.Message)
			_ = dc.raw.Close()
			reset(c)
			return true
		default:
			// Dead before its status: nothing reached the client; the
			// next idle one, or the stream, carries it.
			p.m.poolStale.Inc()
			s.log.Debug("pooled data connection dead before its status, trying the next", "err", err)
			_ = dc.raw.Close()
		}
	}
}

// overLimit names the data-port limit that load exceeds (the reason label
// of connsRefused), or returns "". An idle connection costs kilobytes
// (internal/relay holds large buffers only while data flows), but it still
// holds goroutines, sockets and a yamux stream: the caps bound how many.
func (p *PS) overLimit(load connLoad) string {
	switch {
	case load.pair > int64(p.cfg.MaxConnsPerPort):
		return "port_limit"
	case load.total > int64(p.cfg.MaxConns):
		return "total_limit"
	}
	return ""
}

// reset closes c with a RST, so the client sees a refusal at once.
func reset(c net.Conn) {
	relay.Reset(c)
	_ = c.Close()
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

package ps

import (
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/tether-net/tether/internal/relay"
	"github.com/tether-net/tether/tunnel"
)

// OpenTimeout bounds opening a stream on a tunnel for a client connection.
const OpenTimeout = 5 * time.Second

// handleConn carries a client connection that arrived on port over the
// tunnel of the agent that owns the port. It is the connHandler of the PS's
// data plane.
func (p *PS) handleConn(port uint16, c net.Conn) {
	src := addrPortOf(c.RemoteAddr())
	if !p.allow.Allows(src.Addr()) {
		p.m.clientsRejected.Inc()
		p.log.Debug("client outside --allow-clients", "port", port, "client", src.String())
		reset(c)
		return
	}
	p.bmu.RLock()
	b := p.bindings[port]
	p.bmu.RUnlock()
	if b == nil {
		p.m.streamErrors.WithLabelValues("no_route").Inc()
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
	p.m.streams.Inc()
	p.m.streamsOpen.Inc()
	defer p.m.streamsOpen.Dec()
	st, err := s.tun.Open(tunnel.StreamHeader{Target: b.target, Source: src}, OpenTimeout)
	if err != nil {
		p.m.streamErrors.WithLabelValues("open_failed").Inc()
		s.log.Debug("open stream failed", "target", b.target.String(), "client", src.String(), "err", err)
		reset(c)
		return
	}
	_, _, err = relay.Join(relay.HalfClose(c), st, p.m.bytesToAgent, p.m.bytesFromAgent)
	var se *tunnel.StreamError
	if errors.As(err, &se) {
		p.m.streamErrors.WithLabelValues(se.Code.String()).Inc()
		s.log.Debug("agent refused stream", "target", b.target.String(), "client", src.String(), "code", se.Code.String(), "reason", se.Message)
	}
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

package ps

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// psSession is one agent tunnel on this PS.
type psSession struct {
	serial  uint64
	agentID string
	epoch   uint64
	// cred is the key of the credential the agent authenticated with;
	// quota is what the session counts against that credential's quotas.
	cred  string
	quota usage
	log   *slog.Logger
	tun   *tunnel.PSSession
	// tunnelLocal is the address the agent reached this PS's tunnel
	// listener at: the default address its pool grant names (pool.go).
	tunnelLocal netip.AddrPort
	// inflight counts the client connections this session carries now;
	// once superseded, it is closed when they have ended (retire).
	inflight atomic.Int64

	mu       sync.Mutex
	bindings map[netip.AddrPort]*binding
}

// takeBindings detaches and returns the session's bindings, so that
// whoever takes them (a release, or a newer session) is their only owner.
func (s *psSession) takeBindings() map[netip.AddrPort]*binding {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.bindings
	s.bindings = nil
	return b
}

// binding is one exposed endpoint: an address and port of this PS carried
// to a target over the session that currently owns it.
type binding struct {
	at      netip.AddrPort
	target  netip.AddrPort
	agentID string
	sess    atomic.Pointer[psSession]
	// ready is closed when the handshake that allocated the binding ended,
	// either way (sess is set by then, or never). It is shared by every
	// binding of that handshake: one channel per handshake, not one per
	// idle endpoint.
	ready <-chan struct{}
}

func (b *binding) setSession(s *psSession) { b.sess.Store(s) }

// agentSlot serialises the handshakes and teardowns of one agent id and
// holds its current (newest-epoch) session.
type agentSlot struct {
	mu      sync.Mutex
	refs    int
	current *psSession
}

func (p *PS) lockAgent(id string) *agentSlot {
	p.mu.Lock()
	s := p.agents[id]
	if s == nil {
		s = &agentSlot{}
		p.agents[id] = s
	}
	s.refs++
	p.mu.Unlock()
	s.mu.Lock()
	return s
}

func (p *PS) unlockAgent(id string, s *agentSlot) {
	s.mu.Unlock()
	p.mu.Lock()
	s.refs--
	if s.refs == 0 && s.current == nil {
		delete(p.agents, id)
	}
	p.mu.Unlock()
}

// endSession releases what a closed tunnel held, unless a newer session
// took it over.
func (p *PS) endSession(ctx context.Context, s *psSession) {
	slot := p.lockAgent(s.agentID)
	if slot.current == s {
		slot.current = nil
	}
	bs := s.takeBindings()
	p.unlockAgent(s.agentID, slot)
	p.mu.Lock()
	delete(p.sessions, s)
	p.mu.Unlock()
	p.pools.drop(s)
	p.m.tunnels.Dec()
	p.quotas.release(s.cred, s.quota)
	list := make([]*binding, 0, len(bs))
	for _, b := range bs {
		list = append(list, b)
	}
	p.releaseBindings(ctx, list, true)
	s.log.Info("tunnel closed", "released_ports", len(list))
}

// releaseBindings stops serving bindings and gives their ports back. With
// quarantine (the ports were published), the registry's Release quarantines
// the ports before it withdraws the routes, so that even a failure halfway
// cannot let a port be reused while a reader may still map it to its old
// target; locally they are quarantined at once.
func (p *PS) releaseBindings(ctx context.Context, bs []*binding, quarantine bool) {
	if len(bs) == 0 {
		return
	}
	pairs := make([]netip.AddrPort, 0, len(bs))
	pubs := make([]registry.Publication, 0, len(bs))
	p.bmu.Lock()
	for _, b := range bs {
		if p.bindings[b.at] == b {
			delete(p.bindings, b.at)
		}
		b.sess.Store(nil)
		pairs = append(pairs, b.at)
		pubs = append(pubs, registry.Publication{Target: b.target, Addr: b.at.Addr(), Port: b.at.Port(), AgentID: b.agentID})
	}
	p.bmu.Unlock()
	for _, at := range pairs {
		p.plane.Release(at)
	}
	if !quarantine {
		p.alloc.free(pairs)
		return
	}
	until := time.Now().Add(p.cfg.Quarantine)
	p.alloc.release(pairs, until)
	if p.leaseLost.Load() {
		// Another instance holds this id now: its routes are not ours to
		// touch (and the registry would refuse the write anyway).
		return
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.HandshakeTimeout)
	defer cancel()
	if err := p.reg.Release(ctx, p.cfg.ID, pubs, until); err != nil {
		p.log.Warn("release of routes failed; the resync will retry", "routes", len(pubs), "err", err)
	}
}

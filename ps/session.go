package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-net/tether/registry"
)

// psSession is one agent tunnel on this PS.
type psSession struct {
	serial  uint64
	agentID string
	epoch   uint64
	log     *slog.Logger
	tun     *PSSession

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

// binding is one exposed endpoint: a port of this PS carried to a target
// over the session that currently owns it.
type binding struct {
	port    uint16
	target  netip.AddrPort
	agentID string
	sess    atomic.Pointer[psSession]
	ready   chan struct{} // closed when sess is first set
	once    sync.Once
}

func (b *binding) setSession(s *psSession) {
	b.sess.Store(s)
	b.once.Do(func() { close(b.ready) })
}

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

// serveTunnel runs one agent connection: handshake, then the session until
// the tunnel ends, then the release of its endpoints.
func (p *PS) serveTunnel(raw net.Conn) {
	gateHeld := true
	releaseGate := func() {
		if gateHeld {
			gateHeld = false
			p.gate.release()
		}
	}
	defer releaseGate()
	log := p.log.With("remote", raw.RemoteAddr().String())
	_ = raw.SetDeadline(time.Now().Add(p.cfg.HandshakeTimeout))
	conn := raw
	if p.tls != nil {
		tc := tls.Server(raw, p.tls)
		if err := tc.Handshake(); err != nil {
			p.m.handshakes.WithLabelValues("tls_error").Inc()
			log.Warn("refused tunnel", "code", "tls_error", "reason", err.Error())
			_ = raw.Close()
			return
		}
		conn = tc
	}
	hello, err := ReadHello(conn)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			p.refuse(conn, log, CodeTimeout, fmt.Sprintf("handshake not completed within %v", p.cfg.HandshakeTimeout))
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed):
			p.m.handshakes.WithLabelValues("closed").Inc()
			log.Warn("refused tunnel", "code", "closed", "reason", "connection closed during the handshake: "+err.Error())
			_ = conn.Close()
		default:
			p.refuse(conn, log, RefuseCode(err), err.Error())
		}
		return
	}
	log = log.With("agent_id", hello.AgentID, "epoch", hello.Epoch)
	s, rf := p.admit(conn, hello, log)
	if rf != nil {
		p.refuse(conn, log, rf.Code, rf.Reason)
		return
	}
	if s == nil {
		return // admit has logged and closed
	}
	releaseGate()
	<-s.tun.Done()
	p.endSession(s)
}

func (p *PS) refuse(conn net.Conn, log *slog.Logger, code Code, reason string) {
	p.m.handshakes.WithLabelValues(code.String()).Inc()
	log.Warn("refused tunnel", "code", code.String(), "reason", reason)
	p.closeRefused(conn, &Refuse{Code: code, Reason: reason})
}

// admit checks a Hello, allocates and publishes its endpoints, answers the
// Welcome and starts the session. A newer epoch takes over the ports of
// the agent's older session here (same targets keep their ports) and the
// older session is closed in the background, never blocking this one.
func (p *PS) admit(conn net.Conn, h *Hello, log *slog.Logger) (*psSession, *Refuse) {
	rule, ok := p.auth.check(h.Token)
	if !ok {
		return nil, &Refuse{Code: CodeUnauthorized, Reason: "token not accepted"}
	}
	if p.draining.Load() {
		return nil, &Refuse{Code: CodeUnavailable, Reason: "ps is draining"}
	}
	for _, id := range h.HeldPS {
		if id == p.cfg.ID {
			return nil, &Refuse{Code: CodeDuplicatePS, Reason: fmt.Sprintf("agent already holds a tunnel on ps %s", p.cfg.ID)}
		}
	}
	if !inPrefixes(p.agentNets, h.AgentIP) || !inPrefixes(rule.cidrs, h.AgentIP) {
		return nil, &Refuse{Code: CodeForbidden, Reason: fmt.Sprintf("agent ip %s is outside the CIDRs this agent may use", h.AgentIP)}
	}

	slot := p.lockAgent(h.AgentID)
	defer p.unlockAgent(h.AgentID, slot)
	cur := slot.current
	if cur != nil && cur.epoch >= h.Epoch {
		return nil, &Refuse{Code: CodeStaleEpoch, Reason: fmt.Sprintf("epoch %d is not newer than the live session's %d", h.Epoch, cur.epoch)}
	}
	var curBindings map[netip.AddrPort]*binding
	if cur != nil {
		cur.mu.Lock()
		curBindings = cur.bindings
		cur.mu.Unlock()
	}

	// Plan: refuse what is not allowed, keep the ports of targets the old
	// session already had, allocate the rest in one pass.
	results := make([]EndpointResult, len(h.Endpoints))
	chosen := make([]*binding, len(h.Endpoints))
	seen := make(map[netip.AddrPort]struct{}, len(h.Endpoints))
	var need []int
	for i, ep := range h.Endpoints {
		switch _, dup := seen[ep]; {
		case dup:
			results[i] = EndpointResult{Code: CodeBadRequest, Reason: fmt.Sprintf("endpoint %s listed twice", ep)}
			continue
		case !inPrefixes(p.agentNets, ep.Addr()):
			results[i] = EndpointResult{Code: CodeForbidden, Reason: fmt.Sprintf("endpoint %s is outside the ps's --agent-cidrs", ep)}
			continue
		case !inPrefixes(rule.cidrs, ep.Addr()):
			results[i] = EndpointResult{Code: CodeForbidden, Reason: fmt.Sprintf("endpoint %s is outside the CIDRs of this agent's token", ep)}
			continue
		}
		seen[ep] = struct{}{}
		if b := curBindings[ep]; b != nil {
			chosen[i] = b
			continue
		}
		need = append(need, i)
	}
	ports, allocErr := p.alloc.allocate(len(need), func(port uint16) error { return p.plane.Open(port) })
	var fresh []*binding
	for k, i := range need {
		if k >= len(ports) {
			results[i] = EndpointResult{Code: CodeNoPorts, Reason: allocErr.Error()}
			continue
		}
		b := &binding{port: ports[k], target: h.Endpoints[i], agentID: h.AgentID, ready: make(chan struct{})}
		chosen[i] = b
		fresh = append(fresh, b)
	}
	// Fresh bindings are visible to the data path before they are
	// published, so a client that learns the port at once waits for the
	// session instead of being reset.
	p.bmu.Lock()
	for _, b := range fresh {
		p.bindings[b.port] = b
	}
	p.bmu.Unlock()

	pubs := make([]registry.Publication, 0, len(h.Endpoints))
	pubIdx := make([]int, 0, len(h.Endpoints))
	for i, b := range chosen {
		if b != nil {
			pubs = append(pubs, registry.Publication{Target: b.target, Port: b.port, AgentID: h.AgentID})
			pubIdx = append(pubIdx, i)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.HandshakeTimeout)
	errs, err := p.reg.Publish(ctx, p.cfg.ID, pubs)
	cancel()
	if err != nil {
		// Some batches may have been written: quarantine rather than free.
		p.releaseBindings(fresh, true)
		log.Error("publish endpoints failed", "err", err)
		return nil, &Refuse{Code: CodeUnavailable, Reason: "registry unavailable, retry later"}
	}
	var dropped []*binding // bindings refused by the registry
	for j, perr := range errs {
		if perr == nil {
			continue
		}
		i := pubIdx[j]
		results[i] = EndpointResult{Code: CodeConflict, Reason: perr.Error()}
		dropped = append(dropped, chosen[i])
		chosen[i] = nil
	}

	s := &psSession{agentID: h.AgentID, epoch: h.Epoch, bindings: make(map[netip.AddrPort]*binding, len(pubs))}
	accepted := 0
	for i, b := range chosen {
		if b != nil {
			results[i] = EndpointResult{Port: b.port}
			s.bindings[b.target] = b
			accepted++
		}
	}
	w := &Welcome{PSID: p.cfg.ID, PSAddr: p.advertise, Endpoints: results}
	if err := WriteWelcome(conn, w); err != nil {
		p.releaseBindings(fresh, true)
		p.m.handshakes.WithLabelValues("closed").Inc()
		log.Warn("refused tunnel", "code", "closed", "reason", "could not send welcome: "+err.Error())
		_ = conn.Close()
		return nil, nil
	}
	_ = conn.SetDeadline(time.Time{})
	tun, err := NewPSSession(conn, log, p.window)
	if err != nil {
		p.releaseBindings(fresh, true)
		_ = conn.Close()
		return nil, &Refuse{Code: CodeInternal, Reason: err.Error()}
	}
	s.tun = tun

	// Commit: the new session owns its bindings, the old one is superseded.
	p.mu.Lock()
	p.nextSess++
	s.serial = p.nextSess
	p.sessions[s] = struct{}{}
	p.mu.Unlock()
	s.log = log.With("session", s.serial)
	var leftovers []*binding
	if cur != nil {
		for target, b := range cur.takeBindings() {
			if s.bindings[target] != b {
				leftovers = append(leftovers, b)
			}
		}
		go func() { _ = cur.tun.Close() }()
		log.Info("newer session supersedes the old one", "old_epoch", cur.epoch)
	}
	for _, b := range s.bindings {
		b.setSession(s)
	}
	slot.current = s
	p.m.tunnels.Inc()
	p.m.handshakes.WithLabelValues("ok").Inc()
	// Dropped fresh bindings were never published; dropped reused ones and
	// the old session's other bindings were, so they are quarantined.
	go func() {
		var freshDropped, oldDropped []*binding
		for _, b := range dropped {
			if isIn(fresh, b) {
				freshDropped = append(freshDropped, b)
			} else {
				oldDropped = append(oldDropped, b)
			}
		}
		p.releaseBindings(freshDropped, false)
		p.releaseBindings(append(oldDropped, leftovers...), true)
	}()
	logged := 0
	for i, r := range results {
		if r.Code != CodeOK && logged < 10 {
			logged++
			s.log.Warn("endpoint refused", "target", h.Endpoints[i].String(), "code", r.Code.String(), "reason", r.Reason)
		}
	}
	s.log.Info("tunnel established", "endpoints", len(h.Endpoints), "accepted", accepted, "refused", len(h.Endpoints)-accepted)
	return s, nil
}

func isIn(list []*binding, b *binding) bool {
	for _, x := range list {
		if x == b {
			return true
		}
	}
	return false
}

// endSession releases what a closed tunnel held, unless a newer session
// took it over.
func (p *PS) endSession(s *psSession) {
	slot := p.lockAgent(s.agentID)
	if slot.current == s {
		slot.current = nil
	}
	bs := s.takeBindings()
	p.unlockAgent(s.agentID, slot)
	p.mu.Lock()
	delete(p.sessions, s)
	p.mu.Unlock()
	p.m.tunnels.Dec()
	list := make([]*binding, 0, len(bs))
	for _, b := range bs {
		list = append(list, b)
	}
	p.releaseBindings(list, true)
	s.log.Info("tunnel closed", "released_ports", len(list))
}

// releaseBindings stops serving bindings and gives their ports back. With
// quarantine (the ports were published), the ports are quarantined in the
// registry before the routes are withdrawn, so that even a failure halfway
// cannot let a port be reused while a reader may still map it to its old
// target; locally they are quarantined at once.
func (p *PS) releaseBindings(bs []*binding, quarantine bool) {
	if len(bs) == 0 {
		return
	}
	ports := make([]uint16, 0, len(bs))
	pubs := make([]registry.Publication, 0, len(bs))
	p.bmu.Lock()
	for _, b := range bs {
		if p.bindings[b.port] == b {
			delete(p.bindings, b.port)
		}
		b.sess.Store(nil)
		ports = append(ports, b.port)
		pubs = append(pubs, registry.Publication{Target: b.target, Port: b.port, AgentID: b.agentID})
	}
	p.bmu.Unlock()
	for _, port := range ports {
		p.plane.Release(port)
	}
	if !quarantine {
		p.alloc.free(ports)
		return
	}
	until := time.Now().Add(p.cfg.Quarantine)
	p.alloc.release(ports, until)
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.HandshakeTimeout)
	defer cancel()
	if err := p.reg.Quarantine(ctx, p.cfg.ID, ports, until); err != nil {
		p.log.Warn("quarantine released ports failed; the resync will retry", "ports", len(ports), "err", err)
	}
	if err := p.reg.Withdraw(ctx, p.cfg.ID, pubs); err != nil {
		p.log.Warn("withdraw released routes failed; the resync will retry", "routes", len(pubs), "err", err)
	}
}

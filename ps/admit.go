package ps

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
	"slices"
	"time"

	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// serveTunnel runs one agent connection: handshake, then the session until
// the tunnel ends, then the release of its endpoints. The caller holds a
// handshake slot of the gate and of the source's limit; both are given
// back as soon as the handshake ends.
func (p *PS) serveTunnel(ctx context.Context, raw net.Conn, source netip.Addr) {
	accepted := time.Now()
	gateHeld := true
	releaseGate := func() {
		if gateHeld {
			gateHeld = false
			p.sources.release(source)
			p.gate.release()
		}
	}
	defer releaseGate()
	log := p.log.With("remote", raw.RemoteAddr().String())
	// A short deadline for TLS and the Hello, so a silent peer holds its
	// slot briefly; the rest of the handshake (registry writes) gets the
	// full handshake timeout.
	_ = raw.SetDeadline(time.Now().Add(p.cfg.PreambleTimeout))
	conn, hello, err := p.readHello(raw)
	if err != nil {
		p.refuse(conn, log, err)
		return
	}
	_ = raw.SetDeadline(time.Now().Add(p.cfg.HandshakeTimeout))
	log = log.With("agent_id", hello.AgentID, "epoch", hello.Epoch)
	s, err := p.admit(ctx, conn, hello, source, log)
	if err != nil {
		p.refuse(conn, log, err)
		return
	}
	releaseGate()
	p.m.handshakeSeconds.Observe(time.Since(accepted).Seconds())
	<-s.tun.Done()
	p.endSession(ctx, s)
}

// errClosed marks a handshake that ended because the agent went away:
// there is nobody to send a refusal to.
var errClosed = errors.New("connection closed during the handshake")

// readHello runs TLS (when configured) and reads the agent's Hello. The
// returned connection is the one to answer on, also when err is set.
func (p *PS) readHello(raw net.Conn) (net.Conn, *tunnel.Hello, error) {
	conn := raw
	if p.tls != nil {
		tc := tls.Server(tunnel.BatchRecords(raw), p.tls)
		if err := tc.Handshake(); err != nil {
			return raw, nil, &handshakeError{code: "tls_error", err: err}
		}
		conn = tc
	}
	hello, err := tunnel.ReadHello(conn)
	switch {
	case err == nil:
		return conn, hello, nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		return conn, nil, &tunnel.Refuse{Code: tunnel.CodeTimeout, Reason: fmt.Sprintf("hello not received within %v (--preamble-timeout)", p.cfg.PreambleTimeout)}
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed):
		return conn, nil, fmt.Errorf("%w: %w", errClosed, err)
	default:
		return conn, nil, &tunnel.Refuse{Code: tunnel.RefuseCode(err), Reason: err.Error()}
	}
}

// handshakeError is a handshake that failed below the tunnel protocol (TLS):
// it is counted under code and the connection is closed without an answer.
type handshakeError struct {
	code string
	err  error
}

func (e *handshakeError) Error() string { return e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

// refuse counts and logs a failed handshake, and answers the agent with a
// Refuse when err carries one; other errors just close the connection.
func (p *PS) refuse(conn net.Conn, log *slog.Logger, err error) {
	var rf *tunnel.Refuse
	var he *handshakeError
	switch {
	case errors.As(err, &rf):
		p.m.handshakes.WithLabelValues(rf.Code.String()).Inc()
		level := slog.LevelWarn
		if rf.Code == tunnel.CodeDuplicatePS {
			// Routine, not trouble: an agent with fewer PS nodes than
			// --tunnels probes for another one now and then. Counted.
			level = slog.LevelDebug
		}
		log.Log(context.Background(), level, "refused tunnel", "code", rf.Code.String(), "reason", rf.Reason)
		p.closeRefused(conn, rf)
		return
	case errors.As(err, &he):
		p.m.handshakes.WithLabelValues(he.code).Inc()
		log.Warn("refused tunnel", "code", he.code, "reason", he.err.Error())
	default:
		p.m.handshakes.WithLabelValues("closed").Inc()
		log.Warn("refused tunnel", "code", "closed", "reason", err.Error())
	}
	_ = conn.Close()
}

// admission is one agent's handshake on its way through admit's steps.
type admission struct {
	hello  *tunnel.Hello
	log    *slog.Logger
	source netip.Addr // the tunnel's observed source address
	cred   *credential
	// granted is how many endpoints the credential's quota granted.
	granted int
	// cur is the agent's live session on this PS, if any: a newer epoch
	// supersedes it, keeping the ports of the targets both expose.
	cur *psSession
	// results answers each endpoint of the Hello, in its order; chosen
	// holds the binding that will serve it (nil when refused).
	results []tunnel.EndpointResult
	chosen  []*binding
	// fresh are the bindings allocated for this handshake (the others
	// were cur's); dropped are chosen bindings the registry refused.
	fresh   []*binding
	dropped []*binding
	// ready is the fresh bindings' ready channel (binding.ready): admit
	// closes it when it returns, after commit set their session.
	ready chan struct{}
}

// admit takes a Hello through the steps of admission: authenticate, plan
// the endpoints, allocate ports, publish the routes, send the Welcome and
// commit the session. A step that fails undoes what the earlier ones did;
// an error carrying a *tunnel.Refuse is answered to the agent as such.
func (p *PS) admit(ctx context.Context, conn net.Conn, h *tunnel.Hello, source netip.Addr, log *slog.Logger) (*psSession, error) {
	cred, err := p.authenticate(conn, h, source)
	if err != nil {
		return nil, err
	}
	slot := p.lockAgent(h.AgentID)
	defer p.unlockAgent(h.AgentID, slot)
	a := &admission{hello: h, log: log, source: source, cred: cred, cur: slot.current, ready: make(chan struct{})}
	// A client connection that arrived on a fresh binding waits for this
	// (handleConn): it then finds the session, or, if the handshake
	// failed, no session and a reset, at once.
	defer close(a.ready)
	var credit usage
	if a.cur != nil {
		// Only the credential that holds the agent id may supersede its
		// session: another token cannot take an agent over by claiming
		// its id with a higher epoch.
		if a.cur.cred != cred.key {
			return nil, &tunnel.Refuse{Code: tunnel.CodeForbidden, Reason: fmt.Sprintf("agent %q is live on this ps under another credential", h.AgentID)}
		}
		if a.cur.epoch >= h.Epoch {
			return nil, &tunnel.Refuse{Code: tunnel.CodeStaleEpoch, Reason: fmt.Sprintf("epoch %d is not newer than the live session's %d", h.Epoch, a.cur.epoch)}
		}
		credit = a.cur.quota
	}
	eligible := p.plan(a)
	if a.granted, err = p.quotas.reserve(cred.key, len(eligible), credit); err != nil {
		return nil, err
	}
	need := p.applyQuota(a, eligible)
	p.allocate(a, need)
	if err := p.publish(ctx, a); err != nil {
		// Some batches may have been written: quarantine rather than free.
		p.releaseBindings(ctx, a.fresh, true)
		p.quotas.release(cred.key, usage{tunnels: 1, endpoints: a.granted})
		log.Error("publish endpoints failed", "err", err)
		return nil, &tunnel.Refuse{Code: tunnel.CodeUnavailable, Reason: "registry unavailable, retry later"}
	}
	tun, err := p.welcome(conn, a)
	if err != nil {
		p.releaseBindings(ctx, a.fresh, true)
		p.quotas.release(cred.key, usage{tunnels: 1, endpoints: a.granted})
		return nil, err
	}
	s := p.commit(ctx, a, tun)
	s.tunnelLocal = addrPortOf(conn.LocalAddr())
	slot.current = s
	go p.serveControl(ctx, s)
	return s, nil
}

// maxEpochLead bounds how far ahead of this PS's clock an agent's epoch
// (nanoseconds since 1970 at the agent's start, plus a counter) may be:
// without a bound, one session with epoch 2^64-1 would make every later
// session of its agent id stale forever.
const maxEpochLead = time.Hour

// authenticate checks the agent's credential and what the PS allows before
// any state is touched, and returns the credential.
func (p *PS) authenticate(conn net.Conn, h *tunnel.Hello, source netip.Addr) (*credential, error) {
	cred, err := p.auth.authenticate(conn, h.AgentID, h.Token, source)
	if err != nil {
		return nil, err
	}
	if limit := time.Now().Add(maxEpochLead); h.Epoch > uint64(limit.UnixNano()) {
		return nil, &tunnel.Refuse{Code: tunnel.CodeBadRequest, Reason: fmt.Sprintf("epoch %d is more than %v ahead of this ps's clock", h.Epoch, maxEpochLead)}
	}
	if p.draining.Load() {
		return nil, &tunnel.Refuse{Code: tunnel.CodeUnavailable, Reason: "ps is draining"}
	}
	if slices.Contains(h.HeldPS, p.cfg.ID) {
		return nil, &tunnel.Refuse{Code: tunnel.CodeDuplicatePS, Reason: fmt.Sprintf("agent already holds a tunnel on ps %s", p.cfg.ID)}
	}
	if why := p.exposure.check(h.AgentIP, cred, source); why != "" {
		return nil, &tunnel.Refuse{Code: tunnel.CodeForbidden, Reason: "agent ip " + why}
	}
	return cred, nil
}

// plan refuses the endpoints that are not allowed, keeps the bindings of
// targets the superseded session already had, and returns the indexes of
// the endpoints that may be served.
func (p *PS) plan(a *admission) (eligible []int) {
	eps := a.hello.Endpoints
	a.results = make([]tunnel.EndpointResult, len(eps))
	a.chosen = make([]*binding, len(eps))
	var kept map[netip.AddrPort]*binding
	if a.cur != nil {
		a.cur.mu.Lock()
		kept = a.cur.bindings
		a.cur.mu.Unlock()
	}
	seen := make(map[netip.AddrPort]struct{}, len(eps))
	for i, ep := range eps {
		if _, dup := seen[ep]; dup {
			a.results[i] = tunnel.EndpointResult{Code: tunnel.CodeBadRequest, Reason: fmt.Sprintf("endpoint %s listed twice", ep)}
			continue
		}
		if why := p.exposure.check(ep.Addr(), a.cred, a.source); why != "" {
			a.results[i] = tunnel.EndpointResult{Code: tunnel.CodeForbidden, Reason: "endpoint " + why}
			continue
		}
		seen[ep] = struct{}{}
		a.chosen[i] = kept[ep]
		eligible = append(eligible, i)
	}
	return eligible
}

// applyQuota refuses the eligible endpoints beyond what the credential's
// quota granted, and returns the indexes of those that need a fresh port.
func (p *PS) applyQuota(a *admission, eligible []int) (need []int) {
	for k, i := range eligible {
		if k >= a.granted {
			a.results[i] = tunnel.EndpointResult{Code: tunnel.CodeQuota, Reason: fmt.Sprintf("this credential may expose at most %d endpoints on this ps (--credential-endpoints)", p.quotas.maxEndpoints)}
			a.chosen[i] = nil
			continue
		}
		if a.chosen[i] == nil {
			need = append(need, i)
		}
	}
	return need
}

// allocate gives each endpoint of need a fresh (address, port) in one pass. Fresh
// bindings are visible to the data path before they are published, so a
// client that learns the port at once waits for the session instead of
// being reset.
func (p *PS) allocate(a *admission, need []int) {
	pairs, err := p.alloc.allocate(len(need), p.plane.Open)
	for k, i := range need {
		if k >= len(pairs) {
			a.results[i] = tunnel.EndpointResult{Code: tunnel.CodeNoPorts, Reason: err.Error()}
			continue
		}
		b := &binding{at: pairs[k], target: a.hello.Endpoints[i], agentID: a.hello.AgentID, ready: a.ready}
		a.chosen[i] = b
		a.fresh = append(a.fresh, b)
	}
	p.bmu.Lock()
	for _, b := range a.fresh {
		p.bindings[b.at] = b
	}
	p.bmu.Unlock()
}

// publish records the chosen bindings in the registry. A target another
// live agent holds is refused as a conflict, and its binding dropped.
func (p *PS) publish(ctx context.Context, a *admission) error {
	pubs := make([]registry.Publication, 0, len(a.chosen))
	idx := make([]int, 0, len(a.chosen))
	for i, b := range a.chosen {
		if b != nil {
			pubs = append(pubs, registry.Publication{Target: b.target, Addr: b.at.Addr(), Port: b.at.Port(), AgentID: a.hello.AgentID, Owner: a.cred.key})
			idx = append(idx, i)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.HandshakeTimeout)
	defer cancel()
	errs, err := p.reg.Publish(ctx, p.cfg.ID, pubs)
	if err != nil {
		return err
	}
	for j, perr := range errs {
		if perr == nil {
			continue
		}
		i := idx[j]
		a.results[i] = tunnel.EndpointResult{Code: tunnel.CodeConflict, Reason: perr.Error()}
		a.dropped = append(a.dropped, a.chosen[i])
		a.chosen[i] = nil
	}
	return nil
}

// welcome answers the agent and starts the multiplexer on the tunnel.
func (p *PS) welcome(conn net.Conn, a *admission) (*tunnel.PSSession, error) {
	for i, b := range a.chosen {
		if b != nil {
			a.results[i] = tunnel.EndpointResult{Port: b.at.Port()}
		}
	}
	// The Welcome names the primary address; an endpoint's port may be on
	// another advertise address. The agent uses the port only to name the
	// route in a lost-tunnel report, where (target, ps, port) is unique.
	w := &tunnel.Welcome{PSID: p.cfg.ID, PSAddr: p.advertise[0], Endpoints: a.results}
	if err := tunnel.WriteWelcome(conn, w); err != nil {
		return nil, fmt.Errorf("%w: could not send welcome: %w", errClosed, err)
	}
	_ = conn.SetDeadline(time.Time{})
	tun, err := tunnel.NewPSSession(conn, a.log, p.window, tunnel.OnAgentStream(func() {
		p.m.violations.WithLabelValues("agent_opened_stream").Inc()
	}), tunnel.WithLiveness(tunnel.Liveness{DeadAfter: p.cfg.TunnelDeadAfter, OnDead: func(time.Duration) {
		p.m.silent.Inc()
	}}))
	if err != nil {
		return nil, &tunnel.Refuse{Code: tunnel.CodeInternal, Reason: err.Error()}
	}
	return tun, nil
}

// commit makes the new session the owner of its bindings and supersedes
// the agent's older session, which is closed in the background so it never
// blocks this one. Ports nobody serves any more are released.
func (p *PS) commit(ctx context.Context, a *admission, tun *tunnel.PSSession) *psSession {
	s := &psSession{agentID: a.hello.AgentID, epoch: a.hello.Epoch, cred: a.cred.key, tun: tun, bindings: make(map[netip.AddrPort]*binding, len(a.chosen))}
	for _, b := range a.chosen {
		if b != nil {
			s.bindings[b.target] = b
		}
	}
	// The session holds the quota of what it serves; what the registry
	// refused goes back at once.
	s.quota = usage{tunnels: 1, endpoints: len(s.bindings)}
	p.quotas.release(a.cred.key, usage{endpoints: a.granted - len(s.bindings)})
	p.mu.Lock()
	p.nextSess++
	s.serial = p.nextSess
	p.sessions[s] = struct{}{}
	p.mu.Unlock()
	s.log = a.log.With("session", s.serial)
	var leftovers []*binding
	if a.cur != nil {
		for target, b := range a.cur.takeBindings() {
			if s.bindings[target] != b {
				leftovers = append(leftovers, b)
			}
		}
		// The new session owns the bindings from here on: new client
		// connections go to it. The old one finishes what it carries, in
		// the background, so a half-open old connection never delays
		// this one.
		go p.retire(a.cur, s.log.With("old_session", a.cur.serial, "old_epoch", a.cur.epoch))
		// Its idle data connections would never be paired again.
		p.pools.drop(a.cur)
		s.log.Info("newer session supersedes the old one; the old one finishes its in-flight streams", "old_epoch", a.cur.epoch,
			"old_connections", a.cur.inflight.Load(), "drain_timeout", p.cfg.DrainTimeout)
	}
	for _, b := range s.bindings {
		b.setSession(s)
	}
	p.m.tunnels.Inc()
	p.m.handshakes.WithLabelValues("ok").Inc()
	// Dropped fresh bindings were never published, so their ports are free
	// at once; dropped kept ones and the old session's other bindings were
	// published, so theirs are quarantined.
	var neverPublished, published []*binding
	for _, b := range a.dropped {
		if slices.Contains(a.fresh, b) {
			neverPublished = append(neverPublished, b)
		} else {
			published = append(published, b)
		}
	}
	published = append(published, leftovers...)
	go func() {
		p.releaseBindings(ctx, neverPublished, false)
		p.releaseBindings(ctx, published, true)
	}()
	p.logAdmitted(s, a)
	return s
}

// retire ends a superseded session without cutting what it carries (a
// rolling agent restart: the new agent process took over, the old one
// still serves connections that started on it). It tells the agent that
// no new streams will come (GoAway; nothing would open one anyway, the
// bindings point at the new session), waits until the session's streams
// have ended, at most --drain-timeout, and closes it. A dead or half-open
// old connection is closed sooner by its liveness watchdog.
func (p *PS) retire(old *psSession, log *slog.Logger) {
	start := time.Now()
	// GoAway may wait up to the write timeout on a half-open connection:
	// aside, so the wait below starts at once.
	go func() { _ = old.tun.GoAway() }()
	deadline := time.NewTimer(p.cfg.DrainTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	// The first look comes after a tick: a client connection that loaded
	// the old session just before the takeover counts itself a moment
	// later (handleConn). Streams are counted by the client connections
	// carried, not by yamux, whose count includes the control channel.
	for first := true; first || old.inflight.Load() > 0; first = false {
		select {
		case <-old.tun.Done():
			log.Info("superseded session ended", "took", time.Since(start).Round(time.Millisecond))
			return
		case <-deadline.C:
			log.Warn("superseded session still carries connections after --drain-timeout: closing them", "connections", old.inflight.Load(), "drain_timeout", p.cfg.DrainTimeout)
			_ = old.tun.Close()
			return
		case <-tick.C:
		}
	}
	_ = old.tun.Close()
	log.Info("superseded session closed after its in-flight streams ended", "took", time.Since(start).Round(time.Millisecond))
}

// logAdmitted logs the new tunnel and the first few refused endpoints.
func (p *PS) logAdmitted(s *psSession, a *admission) {
	refused := 0
	for i, r := range a.results {
		if r.Code == tunnel.CodeOK {
			continue
		}
		if refused++; refused <= 10 {
			s.log.Warn("endpoint refused", "target", a.hello.Endpoints[i].String(), "code", r.Code.String(), "reason", r.Reason)
		}
	}
	s.log.Info("tunnel established", "endpoints", len(a.results), "accepted", len(a.results)-refused, "refused", refused)
}

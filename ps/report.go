package ps

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// The control channel of a session (tunnel/SPEC.md, "Control channel"):
// the PS opens it as soon as the session serves, and answers the agent's
// requests on it.
//
//   - LostTunnel: the agent's tunnel to another PS ended. The PS removes
//     that PS's backends of this agent at once (registry.DropBackends),
//     so readers stop sending clients to a dead PS within the change
//     feed's latency instead of waiting out its lease (~2.6 s).
//   - Withdraw: the agent drains (SIGTERM, rolling restart). The PS
//     withdraws the session's routes as it would when the session ends,
//     but keeps the session so the streams in flight finish.

// controlOpenTimeout bounds opening the control stream and the agent's
// answer to it.
const controlOpenTimeout = 5 * time.Second

// reportTimeout bounds the registry write a lost-tunnel report makes; the
// agent waits about a second for the ack before it re-dials, so a slower
// write is better reported as failed.
const reportTimeout = 2 * time.Second

// Results of a lost-tunnel report, the result label of
// tether_ps_lost_tunnel_reports_total.
const (
	reportDropped = "dropped"   // at least one backend removed
	reportNone    = "unmatched" // nothing matched (already gone, or not the agent's)
	reportRefused = "refused"   // the report was not acceptable (see handler)
	reportError   = "error"     // the registry write failed
)

// reportStats counts lost-tunnel reports by result.
type reportStats struct{ results *prometheus.CounterVec }

func newReportStats() *reportStats {
	results := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_ps_lost_tunnel_reports_total",
		Help: "Lost-tunnel reports received from agents over the control channel, by result: dropped (backends of the dead PS removed), unmatched, refused, error.",
	}, []string{"result"})
	for _, r := range []string{reportDropped, reportNone, reportRefused, reportError} {
		results.WithLabelValues(r)
	}
	return &reportStats{results: results}
}

// serveControl opens s's control channel and serves it until the session
// ends. An agent that predates the channel refuses it; its session works
// as before.
func (p *PS) serveControl(ctx context.Context, s *psSession) {
	c, err := s.tun.OpenControl(controlOpenTimeout)
	if err != nil {
		if errors.Is(err, tunnel.ErrNoControl) {
			s.log.Info("agent has no control channel (older version): its lost tunnels are not reported", "err", err)
		} else {
			s.log.Debug("control channel not opened", "err", err)
		}
		return
	}
	s.log.Debug("control channel open")
	if err := c.Serve(ctx, &controlHandler{p: p, s: s}); err != nil {
		select {
		case <-s.tun.Done():
		default:
			s.log.Warn("control channel ended", "err", err)
		}
	}
}

// controlHandler answers one session's control requests.
type controlHandler struct {
	p *PS
	s *psSession
}

// current reports whether s is still its agent's live session here: a
// superseded session speaks for an agent process that is going away.
func (h *controlHandler) current() bool {
	slot := h.p.lockAgent(h.s.agentID)
	defer h.p.unlockAgent(h.s.agentID, slot)
	return slot.current == h.s
}

// LostTunnel removes the dead PS's backends the agent reported, each only
// if it still names this agent, this session's credential (an agent can
// drop nothing but its own routes) and the reported port.
func (h *controlHandler) LostTunnel(ctx context.Context, m *tunnel.LostTunnel) tunnel.Ack {
	p, s := h.p, h.s
	log := s.log.With("dead_ps", m.PSID, "routes", len(m.Routes))
	refuse := func(code tunnel.Code, why string) tunnel.Ack {
		p.m.reports.results.WithLabelValues(reportRefused).Inc()
		log.Info("lost-tunnel report refused", "code", code.String(), "reason", why)
		return tunnel.Ack{Code: code, Reason: why}
	}
	switch {
	case m.PSID == p.cfg.ID:
		return refuse(tunnel.CodeBadRequest, "a tunnel cannot report its own ps as lost")
	case p.leaseLost.Load():
		return refuse(tunnel.CodeUnavailable, "this ps no longer holds its id")
	case !h.current():
		return refuse(tunnel.CodeStaleEpoch, "this session was superseded by a newer one of the agent")
	}
	pubs := make([]registry.Publication, len(m.Routes))
	for i, r := range m.Routes {
		pubs[i] = registry.Publication{Target: r.Target, Port: r.Port}
	}
	ctx, cancel := context.WithTimeout(ctx, reportTimeout)
	defer cancel()
	start := time.Now()
	n, err := p.reg.DropBackends(ctx, m.PSID, s.agentID, s.cred, pubs)
	took := time.Since(start).Round(time.Microsecond)
	if err != nil {
		p.m.reports.results.WithLabelValues(reportError).Inc()
		log.Warn("lost-tunnel report: dropping the dead ps's backends failed", "dropped", n, "err", err)
		return tunnel.Ack{Code: tunnel.CodeUnavailable, Count: uint32(n), Reason: "registry write failed: " + err.Error()}
	}
	result := reportDropped
	if n == 0 {
		result = reportNone
	}
	p.m.reports.results.WithLabelValues(result).Inc()
	log.Info("lost-tunnel report: dropped the dead ps's backends of this agent", "dropped", n, "took", took)
	return tunnel.Ack{Code: tunnel.CodeOK, Count: uint32(n)}
}

// Withdraw withdraws the session's routes (ports quarantined, as when the
// session ends) and keeps the session, so its streams in flight finish.
// It holds the agent's lock, so a newer session's handshake cannot adopt
// bindings that are being withdrawn; a session already superseded has
// none left.
func (h *controlHandler) Withdraw(ctx context.Context) tunnel.Ack {
	p, s := h.p, h.s
	slot := p.lockAgent(s.agentID)
	bs := s.takeBindings()
	if slot.current == s {
		// It serves nothing now: a later handshake of the agent starts
		// afresh instead of superseding it.
		slot.current = nil
	}
	p.unlockAgent(s.agentID, slot)
	// No client connection comes to it any more.
	p.pools.drop(s)
	list := make([]*binding, 0, len(bs))
	for _, b := range bs {
		list = append(list, b)
	}
	p.releaseBindings(ctx, list, true)
	s.log.Info("agent drains: withdrew the session's routes, in-flight streams continue", "withdrawn", len(list))
	return tunnel.Ack{Code: tunnel.CodeOK, Count: uint32(len(list)), Reason: fmt.Sprintf("%d routes withdrawn", len(list))}
}

package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-net/tether/tunnel"
)

// What the agent does through its tunnels' control channels
// (tunnel/SPEC.md, "Control channel"):
//
//   - When a tunnel ends and the agent is not shutting down, it reports the
//     dead PS's routes through every surviving tunnel at once. The PS that
//     receives the report drops them from the registry, so readers stop
//     using the dead PS within the change feed's latency instead of its
//     lease. The slot re-dials only after the acks (or reportTimeout), so a
//     late report can never remove what the reconnection publishes.
//   - On shutdown it drains: each PS withdraws the session's routes, the
//     agent lets readers settle, refuses new streams, waits for the ones in
//     flight (--drain-timeout), then closes.

// Timing of reports and drains.
const (
	// reportTimeout bounds the wait for the acks of a lost-tunnel report.
	reportTimeout = time.Second
	// byeWait bounds the wait for what the control channel received
	// before the tunnel ended (a Bye says the PS closed it on purpose).
	byeWait = 100 * time.Millisecond
	// withdrawTimeout bounds the wait for the ack of a Withdraw.
	withdrawTimeout = 2 * time.Second
	// settleQuiet and settleMax: after the PS withdrew the routes, readers
	// need a moment to hear of it; the agent keeps accepting until no new
	// stream arrived for settleQuiet, or settleMax passed.
	settleQuiet = 300 * time.Millisecond
	settleMax   = time.Second
)

// Results of a lost-tunnel report, the result label of
// tether_agent_lost_tunnel_reports_total.
var reportResults = []string{"ok", "refused", "error", "no_control", "no_tunnel"}

// tracked is a session being served, with what a drain needs to know.
type tracked struct {
	sess       *tunnel.AgentSession
	inflight   atomic.Int64 // streams being handled
	lastStream atomic.Int64 // unix ns of the last stream accepted
	refusing   atomic.Bool  // drain: new streams are refused
	pool       *pool        // the session's data connections (pool.go)
}

func track(s *tunnel.AgentSession) *tracked {
	t := &tracked{sess: s}
	t.lastStream.Store(time.Now().UnixNano())
	return t
}

// tunnelLost decides, once s has ended while the agent is running, whether
// the tunnel was lost (to be reported) or closed on purpose by its PS (a
// newer session of this agent superseded it, or the PS drains or stops:
// reporting it would remove routes that are not dead).
func (a *Agent) tunnelLost(s *tunnel.AgentSession, log *slog.Logger) bool {
	if why, ok := s.ClosedByPS(byeWait); ok {
		log.Info("tunnel closed by the ps on purpose; not reporting it", "ps_id", s.Welcome.PSID, "reason", why)
		return false
	}
	return true
}

// lostRoutes returns the (target, port) pairs the PS of s granted.
func (a *Agent) lostRoutes(s *tunnel.AgentSession) []tunnel.LostRoute {
	out := make([]tunnel.LostRoute, 0, len(s.Welcome.Endpoints))
	for i, r := range s.Welcome.Endpoints {
		if r.Code == tunnel.CodeOK && r.Port != 0 && i < len(a.endpoints) {
			out = append(out, tunnel.LostRoute{Target: a.endpoints[i], Port: r.Port})
		}
	}
	return out
}

// reportLost tells every surviving tunnel's PS that the tunnel to dead's
// PS is lost, in parallel, and returns once each acked or reportTimeout
// passed. The caller has already removed dead from the agent's sessions.
func (a *Agent) reportLost(dead *tunnel.AgentSession, log *slog.Logger) {
	routes := a.lostRoutes(dead)
	if len(routes) == 0 {
		return
	}
	deadID := dead.Welcome.PSID
	a.mu.Lock()
	survivors := make([]*tunnel.AgentSession, 0, len(a.sessions))
	for _, s := range a.sessions {
		if s != dead && s.Welcome.PSID != deadID {
			survivors = append(survivors, s)
		}
	}
	a.mu.Unlock()
	log = log.With("dead_ps", deadID, "routes", len(routes))
	if len(survivors) == 0 {
		a.m.lostReports.WithLabelValues("no_tunnel").Inc()
		log.Info("tunnel lost; no other tunnel to report it through")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), reportTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, s := range survivors {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.reportThrough(ctx, s, deadID, routes, log.With("via_ps", s.Welcome.PSID))
		}()
	}
	wg.Wait()
}

// reportThrough sends one report on s's control channel and logs and
// counts its outcome.
func (a *Agent) reportThrough(ctx context.Context, s *tunnel.AgentSession, deadID string, routes []tunnel.LostRoute, log *slog.Logger) {
	c := s.Control()
	if c == nil {
		a.m.lostReports.WithLabelValues("no_control").Inc()
		log.Info("tunnel lost; the other ps has no control channel to report it through")
		return
	}
	start := time.Now()
	ack, err := c.ReportLost(ctx, deadID, routes)
	took := time.Since(start).Round(time.Microsecond)
	switch {
	case err != nil:
		a.m.lostReports.WithLabelValues("error").Inc()
		log.Warn("lost-tunnel report got no ack", "took", took, "err", err)
	case ack.Code != tunnel.CodeOK:
		a.m.lostReports.WithLabelValues("refused").Inc()
		log.Info("lost-tunnel report refused", "code", ack.Code.String(), "reason", ack.Reason, "took", took)
	default:
		a.m.lostReports.WithLabelValues("ok").Inc()
		log.Info("reported lost tunnel", "dropped", ack.Count, "took", took)
	}
}

// drain ends a session gracefully when the agent shuts down: the PS
// withdraws its routes, readers settle, new streams are refused, the ones
// in flight get until the drain deadline, then the tunnel closes. Close
// (or a second signal, see cmd/tether) ends it at once: the session is
// then done.
func (a *Agent) drain(t *tracked, deadline time.Time, log *slog.Logger) {
	s := t.sess
	start := time.Now()
	done := s.Done()
	acked := false
	// No new pooled connections: the idle ones are closed (the PS then
	// carries the clients of the settle on the tunnel's streams), the
	// paired ones count as in flight below.
	t.pool.stop()
	if c := s.Control(); c != nil {
		ctx, cancel := context.WithTimeout(context.Background(), withdrawTimeout)
		ack, err := c.Withdraw(ctx)
		cancel()
		switch {
		case err != nil:
			log.Warn("drain: withdraw got no ack", "err", err)
		case ack.Code != tunnel.CodeOK:
			log.Warn("drain: withdraw refused", "code", ack.Code.String(), "reason", ack.Reason)
		default:
			acked = true
			log.Info("drain: the ps withdrew this tunnel's routes", "withdrawn", ack.Count)
		}
	}
	// Settle: keep serving until readers stopped sending (no new stream
	// for settleQuiet after the ack), at most settleMax.
	settleEnd := time.Now().Add(settleMax)
	for time.Now().Before(settleEnd) {
		if acked && time.Since(time.Unix(0, t.lastStream.Load())) >= settleQuiet {
			break
		}
		if waitOrDone(done, 20*time.Millisecond) {
			return
		}
	}
	t.refusing.Store(true)
	for t.inflight.Load() > 0 && time.Now().Before(deadline) {
		if waitOrDone(done, 20*time.Millisecond) {
			return
		}
	}
	if n := t.inflight.Load(); n > 0 {
		log.Warn("drain timeout: closing streams still in flight", "streams", n)
	}
	log.Info("drained", "took", time.Since(start).Round(time.Millisecond))
}

// waitOrDone sleeps d and reports whether done closed meanwhile.
func waitOrDone(done <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// errDraining is the refusal of a stream that arrives after the settle.
var errDraining = errors.New("agent is draining")

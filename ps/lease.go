package ps

import (
	"context"
	"net/netip"
	"time"

	"github.com/tether-net/tether/internal/jitter"
	"github.com/tether-net/tether/registry"
)

// renewLoop renews the PS's lease every Renew, and refreshes the gauges.
// A failure is logged once per streak, and its recovery once.
func (p *PS) renewLoop(ctx context.Context) {
	t := time.NewTicker(p.cfg.Renew)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p.updateGauges()
		if p.draining.Load() {
			continue
		}
		if err := p.renew(ctx, registry.PSActive); err != nil {
			if ctx.Err() != nil {
				return
			}
			p.m.renewErrors.Inc()
			if !failing {
				p.log.Warn("lease renewal failed; routes lapse if this lasts past the lease", "lease", p.cfg.Lease, "err", err)
			}
			failing = true
			continue
		}
		if failing {
			p.log.Info("lease renewal recovered")
			failing = false
		}
	}
}

func (p *PS) updateGauges() {
	used, q := p.alloc.counts()
	p.m.portsAllocated.Set(float64(used))
	p.m.portsQuarantined.Set(float64(q))
	p.bmu.RLock()
	n := 0
	for _, b := range p.bindings {
		if b.sess.Load() != nil {
			n++
		}
	}
	p.bmu.RUnlock()
	p.m.endpoints.Set(float64(n))
}

// collectLoop removes the leftovers of dead peers (and of this PS's own
// earlier life): every PS runs it, running it twice is harmless.
func (p *PS) collectLoop(ctx context.Context) {
	every := max(p.cfg.Lease, time.Second)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(jitter.Spread(every, 0.2)):
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		dead, err := p.reg.CollectDead(cctx, 2*p.cfg.Lease, p.cfg.Quarantine)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				p.log.Debug("collect dead ps nodes failed", "err", err)
			}
			continue
		}
		for _, id := range dead {
			p.log.Info("collected the routes of a dead ps", "dead_ps_id", id)
		}
	}
}

// resyncLoop repairs the registry's view of this PS's routes every Resync.
func (p *PS) resyncLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(jitter.Spread(p.cfg.Resync, 0.2)):
		}
		if p.draining.Load() {
			return
		}
		if err := p.resync(ctx); err != nil && ctx.Err() == nil {
			p.log.Debug("resync failed", "err", err)
		}
	}
}

// resync compares the ports the registry records for this PS with the
// bindings it really serves: a recorded port it does not serve (a failed
// withdraw, a crash) is withdrawn and quarantined; a binding the registry
// lacks (Redis lost data, a peer collected this PS during a partition) is
// published again.
func (p *PS) resync(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	used, err := p.reg.PortsInUse(ctx, p.cfg.ID)
	if err != nil {
		return err
	}
	type local struct {
		target netip.AddrPort
		agent  string
	}
	have := map[uint16]local{}
	p.bmu.RLock()
	for port, b := range p.bindings {
		if b.sess.Load() != nil {
			have[port] = local{b.target, b.agentID}
		}
	}
	p.bmu.RUnlock()

	var stale, missing []registry.Publication
	for port, target := range used {
		if l, ok := have[port]; !ok || l.target != target {
			if !p.alloc.isUsed(port) {
				stale = append(stale, registry.Publication{Target: target, Port: port})
			}
		}
	}
	for port, l := range have {
		if t, ok := used[port]; !ok || t != l.target {
			missing = append(missing, registry.Publication{Target: l.target, Port: port, AgentID: l.agent})
		}
	}
	if len(stale) > 0 {
		until := time.Now().Add(p.cfg.Quarantine)
		q := make(map[uint16]time.Time, len(stale))
		for _, s := range stale {
			q[s.Port] = until
		}
		p.alloc.quarantineUntil(q)
		if err := p.reg.Release(ctx, p.cfg.ID, stale, until); err != nil {
			return err
		}
		p.log.Info("resync withdrew routes this ps no longer serves", "routes", len(stale))
	}
	if len(missing) > 0 {
		errs, err := p.reg.Publish(ctx, p.cfg.ID, missing)
		if err != nil {
			return err
		}
		conflicts := 0
		for _, e := range errs {
			if e != nil {
				conflicts++
			}
		}
		p.log.Info("resync republished routes missing from the registry", "routes", len(missing), "conflicts", conflicts)
	}
	q, err := p.reg.Quarantined(ctx, p.cfg.ID)
	if err != nil {
		return err
	}
	p.alloc.quarantineUntil(q)
	return nil
}

// drain is the graceful stop: the lease turns "draining" (readers stop
// sending new connections at once), the ports are quarantined and the
// routes withdrawn, accepting stops, in-flight connections get up to
// DrainTimeout to finish, then the tunnels close and the PS is forgotten.
func (p *PS) drain(ctx context.Context) {
	p.draining.Store(true)
	start := time.Now()
	p.log.Info("draining", "drain_timeout", p.cfg.DrainTimeout)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := p.renew(ctx, registry.PSDraining); err != nil {
		p.log.Warn("drain: could not mark the lease draining", "err", err)
	}
	p.bmu.RLock()
	pubs := make([]registry.Publication, 0, len(p.bindings))
	for port, b := range p.bindings {
		pubs = append(pubs, registry.Publication{Target: b.target, Port: port})
	}
	p.bmu.RUnlock()
	if err := p.reg.Release(ctx, p.cfg.ID, pubs, time.Now().Add(p.cfg.Quarantine)); err != nil {
		p.log.Warn("drain: release of the routes failed", "routes", len(pubs), "err", err)
	}
	p.lnMu.Lock()
	if p.ln != nil {
		_ = p.ln.Close()
	}
	p.lnMu.Unlock()
	_ = p.plane.Close()
	waitZero(&p.inflight, p.cfg.DrainTimeout)
	if n := p.inflight.Load(); n > 0 {
		p.log.Warn("drain timeout: closing connections still in flight", "connections", n)
	}
	p.mu.Lock()
	for s := range p.sessions {
		_ = s.tun.GoAway()
		_ = s.tun.Close()
	}
	p.mu.Unlock()
	waitZero(&p.conns, p.cfg.HandshakeTimeout+time.Second)
	if err := p.reg.Forget(ctx, p.cfg.ID); err != nil {
		p.log.Warn("drain: forget failed", "err", err)
	}
	p.log.Info("drained", "took", time.Since(start).Round(time.Millisecond))
}

// waitZero polls n until it is zero or timeout passes.
func waitZero(n interface{ Load() int64 }, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for n.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

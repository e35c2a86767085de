package ps

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-net/tether/internal/jitter"
	"github.com/tether-net/tether/registry"
)

// claim takes the PS id for this instance under a fresh nonce, retrying
// while the registry is unreachable. A live lease of another instance
// refuses the start, but only once that instance is seen renewing: a
// crashed predecessor's lease, which nobody renews, is waited out (at most
// one lease) and taken over, so that a restart right after a crash is not
// refused.
func (p *PS) claim(ctx context.Context) error {
	p.nonce = newNonce()
	var first *registry.LeaseHeldError
	for attempt := 0; ; attempt++ {
		rctx, cancel := context.WithTimeout(ctx, p.cfg.Lease)
		err := p.reg.ClaimPS(rctx, p.lease(registry.PSActive))
		cancel()
		var held *registry.LeaseHeldError
		wait := p.cfg.Renew
		switch {
		case err == nil:
			p.log.Info("claimed ps id", "nonce", p.nonce)
			return nil
		case errors.As(err, &held):
			if first != nil && (held.Nonce != first.Nonce || held.RenewedMS != first.RenewedMS) {
				return fmt.Errorf("%w; stop it or pick another --id", held)
			}
			if first == nil {
				first = held
				p.log.Warn("ps id held by another instance; waiting to see whether it is alive",
					"holder", held.Addr, "lease_left", held.ExpiresIn)
			}
			wait = min(p.cfg.Renew, held.ExpiresIn+50*time.Millisecond)
		case attempt == 0:
			p.log.Warn("registry unreachable at start, retrying", "err", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("start: %w", err)
		case <-time.After(wait):
		}
	}
}

// newNonce returns 128 random bits in hex: the name of this instance.
func newNonce() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go >= 1.24)
	return hex.EncodeToString(b)
}

// renewLoop renews the PS's lease every Renew, and refreshes the gauges.
// A failure is logged once per streak, and its recovery once. It returns
// an error only when the lease was taken over by another instance: this
// one must stop serving (see leaseTaken).
//
// A renewal that finds the registry lost this PS's data (its lease key
// gone, or the registry's generation changed: a FLUSHALL, a Redis restart
// without persistence, a failover to a replica without the data) has
// already written the lease again under this instance's nonce, which
// re-claims the id; the loop then republishes every binding at once
// (resync) rather than at the next Resync, so the registry is whole again
// within about one renew interval.
func (p *PS) renewLoop(ctx context.Context) error {
	t := time.NewTicker(p.cfg.Renew)
	defer t.Stop()
	failing := false
	var repairs sync.WaitGroup
	defer repairs.Wait()
	var repairing atomic.Bool
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		p.updateGauges()
		if p.draining.Load() {
			continue
		}
		err := p.renew(ctx, registry.PSActive)
		if errors.Is(err, registry.ErrRegistryDataLost) {
			// The lease itself was written: this is a renewal that worked.
			p.republish(ctx, err, &repairs, &repairing)
			err = nil
		}
		if err != nil {
			if errors.Is(err, registry.ErrLeaseTaken) {
				return p.leaseTaken(err)
			}
			if ctx.Err() != nil {
				return nil
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

// republish runs a resync in the background after the registry lost this
// PS's data, unless one is still running: renewals go on meanwhile, so the
// lease never lapses while tens of thousands of routes are written back.
func (p *PS) republish(ctx context.Context, cause error, wg *sync.WaitGroup, running *atomic.Bool) {
	if !running.CompareAndSwap(false, true) {
		return
	}
	p.log.Warn("the registry lost this ps's routes; republishing every binding now", "reason", cause)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer running.Store(false)
		start := time.Now()
		if err := p.resync(ctx); err != nil {
			if ctx.Err() == nil {
				// The periodic resync retries; so does the next renewal
				// if the data is lost again.
				p.log.Warn("republishing after the registry's data loss failed; the periodic resync retries", "err", err)
			}
			return
		}
		p.log.Info("republished every binding after the registry's data loss", "took", time.Since(start).Round(time.Millisecond))
	}()
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
		target       netip.AddrPort
		agent, owner string
	}
	have := map[netip.AddrPort]local{}
	p.bmu.RLock()
	for at, b := range p.bindings {
		if s := b.sess.Load(); s != nil {
			// The owner goes with a republished route: without it, the
			// registry's owner check could not refuse another credential's
			// claim of the agent id on another PS.
			have[at] = local{b.target, b.agentID, s.cred}
		}
	}
	p.bmu.RUnlock()

	var stale, missing []registry.Publication
	for at, target := range used {
		if l, ok := have[at]; !ok || l.target != target {
			if !p.alloc.isUsed(at) {
				stale = append(stale, registry.Publication{Target: target, Addr: at.Addr(), Port: at.Port()})
			}
		}
	}
	for at, l := range have {
		if t, ok := used[at]; !ok || t != l.target {
			missing = append(missing, registry.Publication{Target: l.target, Addr: at.Addr(), Port: at.Port(), AgentID: l.agent, Owner: l.owner})
		}
	}
	if len(stale) > 0 {
		until := time.Now().Add(p.cfg.Quarantine)
		q := make(map[netip.AddrPort]time.Time, len(stale))
		for _, s := range stale {
			q[netip.AddrPortFrom(s.Addr, s.Port)] = until
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

// leaseTaken records that another instance holds this PS's id and
// returns the error Run ends with.
func (p *PS) leaseTaken(err error) error {
	p.leaseLost.Store(true)
	p.log.Error("ps id taken over by another instance: stopping without touching its routes", "err", err)
	return fmt.Errorf("stopped serving: %w", err)
}

// abandon stops serving after the id was taken over: listeners, data
// plane and tunnels close at once, and nothing is written to the registry.
// The routes under this id are the new holder's now; withdrawing them, or
// forgetting the lease, would delete its state (the registry's guard
// refuses such writes anyway, see registry.ClaimPS).
func (p *PS) abandon() {
	p.draining.Store(true)
	p.stopAccepting()
	p.closeTunnels(false)
	waitZero(&p.conns, p.cfg.HandshakeTimeout+time.Second)
	p.log.Info("stopped serving; the registry was left to the new holder of the id")
}

// drain is the graceful stop: the lease turns "draining" (readers stop
// sending new connections at once), the ports are quarantined and the
// routes withdrawn, accepting stops, in-flight connections get up to
// DrainTimeout to finish, then the tunnels close and the PS is forgotten.
func (p *PS) drain(ctx context.Context) {
	if p.leaseLost.Load() {
		p.abandon()
		return
	}
	p.draining.Store(true)
	start := time.Now()
	p.log.Info("draining", "drain_timeout", p.cfg.DrainTimeout)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := p.renew(ctx, registry.PSDraining); errors.Is(err, registry.ErrLeaseTaken) {
		_ = p.leaseTaken(err)
		p.abandon()
		return
	} else if err != nil {
		p.log.Warn("drain: could not mark the lease draining", "err", err)
	}
	p.bmu.RLock()
	pubs := make([]registry.Publication, 0, len(p.bindings))
	for at, b := range p.bindings {
		pubs = append(pubs, registry.Publication{Target: b.target, Addr: at.Addr(), Port: at.Port()})
	}
	p.bmu.RUnlock()
	if err := p.reg.Release(ctx, p.cfg.ID, pubs, time.Now().Add(p.cfg.Quarantine)); err != nil {
		p.log.Warn("drain: release of the routes failed", "routes", len(pubs), "err", err)
	}
	// Keep serving new connections while the readers hear of the drain:
	// a client host whose map still holds this PS would otherwise get a
	// refusal from a port closed a few milliseconds too early.
	settle := min(drainSettle, p.cfg.DrainTimeout/2)
	select {
	case <-ctx.Done():
	case <-time.After(settle):
	}
	p.stopAccepting()
	waitZero(&p.inflight, p.cfg.DrainTimeout)
	if n := p.inflight.Load(); n > 0 {
		p.log.Warn("drain timeout: closing connections still in flight", "connections", n)
	}
	p.closeTunnels(true)
	waitZero(&p.conns, p.cfg.HandshakeTimeout+time.Second)
	if err := p.reg.Forget(ctx, p.cfg.ID); err != nil {
		p.log.Warn("drain: forget failed", "err", err)
	}
	p.log.Info("drained", "took", time.Since(start).Round(time.Millisecond))
}

// stopAccepting closes the tunnel listener, the pool listener and every
// data port, and closes the idle data connections: no new agent and no new
// client connection gets in.
func (p *PS) stopAccepting() {
	p.lnMu.Lock()
	if p.ln != nil {
		_ = p.ln.Close()
	}
	if p.poolLn != nil {
		_ = p.poolLn.Close()
	}
	p.lnMu.Unlock()
	_ = p.plane.Close()
	// No client connection comes any more: idle data connections have
	// nothing left to carry.
	p.pools.dropAll()
}

// closeTunnels closes every agent's tunnel; with goAway it tells the agent
// first that no new stream will come.
func (p *PS) closeTunnels(goAway bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for s := range p.sessions {
		if goAway {
			_ = s.tun.GoAway()
		}
		_ = s.tun.Close()
	}
}

// drainSettle is how long a draining PS keeps accepting new connections
// after it marked itself draining and withdrew its routes: the change feed
// reaches readers in milliseconds, a redirector's map a little later; a
// second covers a loaded host with a wide margin.
const drainSettle = time.Second

// waitZero polls n until it is zero or timeout passes.
func waitZero(n interface{ Load() int64 }, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for n.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

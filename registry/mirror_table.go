package registry

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// This file holds the Mirror's in-memory table: folding snapshots and
// changes into it, expiring leases locally, and the views it hands to
// Lookup and the Sink. mirror.go holds the loops that feed it.

// apply folds a message into the state and tells the sink what changed.
func (m *Mirror) apply(ctx context.Context, msg message) error {
	m.observeLeases(msg)
	now := m.judge.Now()
	if msg.merge {
		return m.applyMerge(ctx, msg, now)
	}
	if msg.snapshot != nil {
		m.mu.Lock()
		m.loadLocked(msg.snapshot)
		m.seen = map[string]psView{}
		for id, l := range m.leases {
			m.seen[id] = viewOf(l, now)
		}
		// One backing array for every view's backends: a full load of a
		// million routes then allocates once, not once per route.
		all := make([]RouteState, 0, len(m.entries))
		buf := make([]BackendState, 0, m.entryCount)
		for t := range m.entries {
			var rs RouteState
			rs, buf = m.appendViewLocked(buf, t, now)
			all = append(all, rs)
		}
		m.metrics.routes.Set(float64(len(m.entries)))
		m.mu.Unlock()
		m.metrics.fullLoads.Inc()
		if m.cfg.Sink != nil {
			if err := m.cfg.Sink.Replace(ctx, all); err != nil {
				return fmt.Errorf("replace %d routes: %w", len(all), err)
			}
		}
		m.metrics.lastLoadDur.Set(m.now().Sub(msg.started).Seconds())
		m.readyOnce.Do(func() { close(m.ready) })
		return nil
	}

	m.mu.Lock()
	affected := map[netip.AddrPort]struct{}{}
	for _, rt := range msg.routes {
		m.setRouteLocked(nil, rt)
		affected[rt.Target] = struct{}{}
	}
	for id, l := range msg.leases {
		m.leases[id] = l
	}
	for _, id := range msg.gone {
		delete(m.leases, id)
	}
	m.collectLeaseChangesLocked(now, affected)
	out := m.viewsLocked(affected, now)
	m.metrics.routes.Set(float64(len(m.entries)))
	m.mu.Unlock()
	m.metrics.changes.Add(float64(msg.changes))
	if m.cfg.Sink != nil && len(out) > 0 {
		if err := m.cfg.Sink.Update(withChangeTime(ctx, msg.changedAt), out); err != nil {
			return fmt.Errorf("update %d routes: %w", len(out), err)
		}
	}
	return nil
}

// observeLeases teaches the lease judge how long leases last.
func (m *Mirror) observeLeases(msg message) {
	leases := msg.leases
	if msg.snapshot != nil {
		leases = msg.snapshot.Leases
		if !msg.merge {
			m.judge.forget(leases)
		}
	}
	now := m.now()
	for id, l := range leases {
		if l.State == PSActive {
			m.judge.observeLease(id, l.ExpiresAt.Sub(now))
		}
	}
}

// applyMerge folds a message read during a repair window into the state:
// the routes' backends and the leases it holds override what the mirror
// has, and nothing is removed for being absent. The registry is being
// written back by its PS nodes then: an absent backend may be one not
// republished yet, and removing it would cut a live backend. A backend
// whose PS really died still lapses with its lease, on the lease clock.
// The sink gets Update, never Replace (which would drop what is absent).
func (m *Mirror) applyMerge(ctx context.Context, msg message, now time.Time) error {
	routes, leases := msg.routes, msg.leases
	if msg.snapshot != nil {
		routes, leases = msg.snapshot.Routes, msg.snapshot.Leases
	}
	m.mu.Lock()
	affected := map[netip.AddrPort]struct{}{}
	for id, l := range leases {
		m.leases[id] = l
	}
	for _, rt := range routes {
		if m.mergeRouteLocked(rt) {
			affected[rt.Target] = struct{}{}
		}
	}
	m.collectLeaseChangesLocked(now, affected)
	out := m.viewsLocked(affected, now)
	m.metrics.routes.Set(float64(len(m.entries)))
	m.mu.Unlock()
	if msg.snapshot != nil {
		m.metrics.fullLoads.Inc()
	} else {
		m.metrics.changes.Add(float64(msg.changes))
	}
	if m.cfg.Sink != nil && len(out) > 0 {
		if err := m.cfg.Sink.Update(ctx, out); err != nil {
			return fmt.Errorf("merge %d routes: %w", len(out), err)
		}
	}
	if msg.snapshot != nil {
		m.metrics.lastLoadDur.Set(m.now().Sub(msg.started).Seconds())
		m.readyOnce.Do(func() { close(m.ready) })
	}
	return nil
}

// mergeRouteLocked sets the entries of rt's backends and keeps the
// target's other entries; it reports whether anything changed.
func (m *Mirror) mergeRouteLocked(rt Route) bool {
	changed := false
	for _, b := range rt.Backends {
		e := m.entryLocked(b)
		es := m.entries[rt.Target]
		i, found := slices.BinarySearchFunc(es, b.PSID, func(e psEntry, id string) int { return strings.Compare(e.PSID, id) })
		if found && es[i] == e {
			continue
		}
		if found {
			es[i] = e
		} else {
			m.entries[rt.Target] = slices.Insert(es, i, e)
			m.entryCount++
		}
		if m.byPS[b.PSID] == nil {
			m.byPS[b.PSID] = map[netip.AddrPort]struct{}{}
		}
		m.byPS[b.PSID][rt.Target] = struct{}{}
		changed = true
	}
	return changed
}

// expire marks the backends of leases that lapsed since the last look.
// It runs on the lease clock: while the registry is out of sight that
// clock stands still, and nothing lapses.
func (m *Mirror) expire(ctx context.Context) error {
	now := m.judge.Now()
	m.mu.Lock()
	affected := map[netip.AddrPort]struct{}{}
	n := m.collectLeaseChangesLocked(now, affected)
	out := m.viewsLocked(affected, now)
	m.mu.Unlock()
	if n > 0 {
		m.metrics.expired.Add(float64(n))
		m.log.Info("ps leases lapsed, their backends are dead", "ps_nodes", n, "routes", len(out))
	}
	if m.cfg.Sink != nil && len(out) > 0 {
		return m.cfg.Sink.Update(ctx, out)
	}
	return nil
}

// collectLeaseChangesLocked compares every PS's view with what the sink
// last saw, adds the targets of those that changed to affected, and returns
// how many PS nodes went from live to dead.
func (m *Mirror) collectLeaseChangesLocked(now time.Time, affected map[netip.AddrPort]struct{}) int {
	died := 0
	ids := map[string]struct{}{}
	for id := range m.seen {
		ids[id] = struct{}{}
	}
	for id := range m.leases {
		ids[id] = struct{}{}
	}
	for id := range ids {
		l, ok := m.leases[id]
		var v psView
		if ok {
			v = viewOf(l, now)
		}
		old, had := m.seen[id]
		if had && old == v {
			continue
		}
		if had && old.live && !v.live {
			died++
		}
		if ok {
			m.seen[id] = v
		} else {
			delete(m.seen, id)
		}
		for t := range m.byPS[id] {
			affected[t] = struct{}{}
		}
	}
	return died
}

// nextExpiry is how long until the earliest live lease lapses, on the
// lease clock. While that clock stands still or trails real time (an
// outage, or the stretch after one) it may resume or jump at any contact,
// so the timer polls then: a look at a few leases, four times a second.
func (m *Mirror) nextExpiry() time.Duration {
	now := m.judge.Now()
	next := time.Minute
	if blind, lag := m.judge.state(); blind || lag > 0 {
		next = 250 * time.Millisecond
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, l := range m.leases {
		if l.Live(now) {
			// A few ms late is better than waking just before the edge.
			if d := l.ExpiresAt.Sub(now) + 5*time.Millisecond; d < next {
				next = d
			}
		}
	}
	return next
}

func viewOf(l PSLease, now time.Time) psView {
	return psView{addr: l.Addr, addrs: addrSetKey(l), live: l.Live(now), draining: l.State == PSDraining}
}

// addrSetKey names a lease's address set in a comparable form, so a view
// changes (and the PS's routes are re-judged) when an address is added or
// dropped. A lease with the one primary address gives "".
func addrSetKey(l PSLease) string {
	if len(l.Addrs) <= 1 {
		return ""
	}
	parts := make([]string, len(l.Addrs))
	for i, a := range l.Addrs {
		parts[i] = a.String()
	}
	return strings.Join(parts, " ")
}

// psEntry is one backend of a target, as the mirror keeps it. A target
// holds its backends in a slice sorted by PS id, not in a map by PS id:
// a target has a handful of backends at most, and a map per target costs
// an allocation of a few hundred bytes, which a full load of a million
// routes pays a million times (measured: a third of the CPU time of the
// redirector's full load of 200,000 routes, with the collection it causes).
type psEntry struct {
	PSID string
	mirrorEntry
}

// comparePSID orders psEntry values by PS id, for the sorted slices.
func comparePSID(a, b psEntry) int { return strings.Compare(a.PSID, b.PSID) }

// mirrorEntry is a backend as the mirror keeps it: what lookups and the
// sink need, without the owner (a million routes would pay for it).
type mirrorEntry struct {
	// Addr is the PS address the port was assigned on; invalid for an
	// entry read without a lease and without an address of its own (it
	// then means the lease's primary address).
	Addr    netip.Addr
	Port    uint16
	AgentID string
	Lost    bool // reported lost by its agent (see Backend.Lost)
}

// loadLocked replaces the table with a snapshot's routes and leases. It
// sizes every map for what the snapshot holds up front: growing them one
// route at a time rehashes them over and over.
func (m *Mirror) loadLocked(snap *Snapshot) {
	m.leases = make(map[string]PSLease, len(snap.Leases))
	for id, l := range snap.Leases {
		m.leases[id] = l
	}
	perPS := map[string]int{}
	total := 0
	for _, rt := range snap.Routes {
		total += len(rt.Backends)
		for _, b := range rt.Backends {
			perPS[b.PSID]++
		}
	}
	m.byPS = make(map[string]map[netip.AddrPort]struct{}, len(perPS))
	for id, n := range perPS {
		m.byPS[id] = make(map[netip.AddrPort]struct{}, n)
	}
	m.entries = make(map[netip.AddrPort][]psEntry, len(snap.Routes))
	m.entryCount = 0
	m.names = make(map[string]string, len(perPS))
	// One backing array for every target's entries, as for the views. A
	// target whose entries change before the next full load gets a slice
	// of its own; its old slots stay unused (and allocated) until then.
	buf := make([]psEntry, 0, total)
	for _, rt := range snap.Routes {
		buf = m.setRouteLocked(buf, rt)
	}
}

// setRouteLocked replaces the entries of rt.Target with rt's backends. It
// builds them at the end of buf and returns buf extended; the target's
// slice has no spare capacity, so growing it later (mergeRouteLocked)
// copies it rather than write over the next target's entries.
func (m *Mirror) setRouteLocked(buf []psEntry, rt Route) []psEntry {
	old := m.entries[rt.Target]
	for _, e := range old {
		if set := m.byPS[e.PSID]; set != nil {
			delete(set, rt.Target)
			if len(set) == 0 {
				delete(m.byPS, e.PSID)
			}
		}
	}
	m.entryCount -= len(old)
	if len(rt.Backends) == 0 {
		delete(m.entries, rt.Target)
		return buf
	}
	start := len(buf)
	for _, b := range rt.Backends {
		buf = append(buf, m.entryLocked(b))
		if m.byPS[b.PSID] == nil {
			m.byPS[b.PSID] = map[netip.AddrPort]struct{}{}
		}
		m.byPS[b.PSID][rt.Target] = struct{}{}
	}
	es := buf[start:len(buf):len(buf)]
	if len(es) > 1 {
		es = sortedByPS(es)
	}
	m.entries[rt.Target] = es
	m.entryCount += len(es)
	return buf
}

// entryLocked is the entry the mirror keeps of a backend.
func (m *Mirror) entryLocked(b Backend) psEntry {
	return psEntry{PSID: m.internLocked(b.PSID), mirrorEntry: mirrorEntry{
		Addr: b.Address.Addr(), Port: b.Address.Port(), AgentID: m.internLocked(b.AgentID), Lost: b.Lost}}
}

// internLocked returns the mirror's copy of s, keeping one copy per id:
// a PS id repeats in every one of its routes, and an agent id in every
// route of that agent, and each id read from Redis is a string of its
// own (one that may share memory with the whole entry it was read from).
// The table lives until the next full load, so an id stops costing
// memory once it is gone from the registry.
func (m *Mirror) internLocked(s string) string {
	if c, ok := m.names[s]; ok {
		return c
	}
	c := strings.Clone(s)
	m.names[c] = c
	return c
}

// sortedByPS sorts es by PS id and keeps one entry per PS, the last one
// given (as a map keyed by PS id would); a route read from a hash never
// repeats one.
func sortedByPS(es []psEntry) []psEntry {
	slices.SortStableFunc(es, comparePSID)
	out := es[:0]
	for i := range es {
		if i+1 < len(es) && es[i+1].PSID == es[i].PSID {
			continue
		}
		out = append(out, es[i])
	}
	return out
}

func (m *Mirror) viewsLocked(targets map[netip.AddrPort]struct{}, now time.Time) []RouteState {
	out := make([]RouteState, 0, len(targets))
	for t := range targets {
		out = append(out, m.viewLocked(t, now))
	}
	slices.SortFunc(out, func(a, b RouteState) int { return a.Target.Compare(b.Target) })
	return out
}

// viewLocked joins a target's entries with the leases. Backends whose PS
// has no lease are left out (the address, or whether it is still the PS's,
// is unknown), and so are those whose address the lease no longer
// advertises (stale, see backendAddress). Backends come in PS id order.
func (m *Mirror) viewLocked(target netip.AddrPort, now time.Time) RouteState {
	rs, _ := m.appendViewLocked(nil, target, now)
	return rs
}

// appendViewLocked is viewLocked building the backends at the end of buf,
// which it returns extended; the view's Backends has no spare capacity, so
// appending to it never writes over the next view's backends in buf.
func (m *Mirror) appendViewLocked(buf []BackendState, target netip.AddrPort, now time.Time) (RouteState, []BackendState) {
	rs := RouteState{Target: target}
	start := len(buf)
	for _, e := range m.entries[target] {
		l, ok := m.leases[e.PSID]
		if !ok || e.Port == 0 {
			continue
		}
		addr := e.Addr
		if !addr.IsValid() {
			addr = l.Addr
		} else if !l.HasAddr(addr) {
			continue
		}
		buf = append(buf, BackendState{
			PSID: e.PSID, Address: netip.AddrPortFrom(addr, e.Port), AgentID: e.AgentID,
			Live: l.Live(now) && !e.Lost, Draining: l.State == PSDraining,
		})
	}
	if len(buf) > start {
		rs.Backends = buf[start:len(buf):len(buf)]
	}
	return rs, buf
}

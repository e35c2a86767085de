package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sort"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/textclip"
)

// Get returns the target's route with its live backends only, or
// ErrNotFound when it has none.
func (r *Registry) Get(ctx context.Context, target netip.AddrPort) (Route, error) {
	raw, err := r.rdb.HGetAll(ctx, r.keys.route(target)).Result()
	if err != nil {
		return Route{}, fmt.Errorf("get route %s: %w", target, err)
	}
	leases, err := r.PSLeases(ctx)
	if err != nil {
		return Route{}, err
	}
	rt := r.buildRoute(target, raw, leases)
	rt.Backends = rt.LiveBackends(r.now())
	if len(rt.Backends) == 0 {
		return Route{}, fmt.Errorf("%s: %w", target, ErrNotFound)
	}
	return rt, nil
}

// List returns every route that has at least one live backend, with its live
// backends, sorted by target.
func (r *Registry) List(ctx context.Context) ([]Route, error) {
	snap, err := r.Snapshot(ctx)
	if err != nil {
		return nil, err
	}
	now := r.now()
	out := make([]Route, 0, len(snap.Routes))
	for _, rt := range snap.Routes {
		rt.Backends = rt.LiveBackends(now)
		if len(rt.Backends) > 0 {
			out = append(out, rt)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Target.Compare(out[j].Target) < 0 })
	return out, nil
}

// Snapshot is the full state of the registry at one moment, with the change
// feed position to follow from.
type Snapshot struct {
	// Routes holds every route with every recorded backend, live or not.
	Routes []Route
	// Leases holds every PS lease, expiries on the reader's clock.
	Leases map[string]PSLease
	// Cursor is the change feed position taken before the data was read:
	// following from it can only replay changes, never miss one.
	Cursor string
	// Generation is the registry's generation (see Registry.Generation),
	// read before the data.
	Generation string
}

// Snapshot reads every route and lease. It pipelines reads in chunks, so
// a million routes take a handful of round trips per chunk, not one each.
func (r *Registry) Snapshot(ctx context.Context) (Snapshot, error) {
	gen, err := r.Generation(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	cursor, err := r.lastID(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	leases, err := r.PSLeases(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	var targets []string
	var scur uint64
	for {
		batch, next, err := r.rdb.SScan(ctx, r.keys.targets(), scur, "", 10000).Result()
		if err != nil {
			return Snapshot{}, fmt.Errorf("list targets: %w", err)
		}
		targets = append(targets, batch...)
		if scur = next; scur == 0 {
			break
		}
	}
	routes, err := r.readRoutes(ctx, targets, leases)
	if err != nil {
		return Snapshot{}, err
	}
	return Snapshot{Routes: routes, Leases: leases, Cursor: cursor, Generation: gen}, nil
}

// readRoutes reads the route hashes of targets (skipping malformed targets)
// and joins them with leases.
func (r *Registry) readRoutes(ctx context.Context, targets []string, leases map[string]PSLease) ([]Route, error) {
	const chunk = 2000
	out := make([]Route, 0, len(targets))
	for start := 0; start < len(targets); start += chunk {
		end := min(start+chunk, len(targets))
		pipe := r.rdb.Pipeline()
		cmds := make([]*redis.MapStringStringCmd, 0, end-start)
		parsed := make([]netip.AddrPort, 0, end-start)
		for _, t := range targets[start:end] {
			ap, err := netip.ParseAddrPort(t)
			if err != nil {
				r.log.Warn("ignoring malformed target in registry", "target", textclip.Short(t))
				continue
			}
			parsed = append(parsed, ap)
			cmds = append(cmds, pipe.HGetAll(ctx, r.keys.routeRaw(t)))
		}
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("read routes: %w", err)
		}
		for i, c := range cmds {
			rt := r.buildRoute(parsed[i], c.Val(), leases)
			if len(rt.Backends) > 0 {
				out = append(out, rt)
			}
		}
	}
	return out, nil
}

// buildRoute joins a route hash with the PS leases. A backend whose PS has
// no lease at all is kept with a zero expiry (dead), so readers can tell it
// apart from a missing one. See backendAddress for the address, and for the
// entries left out as stale.
func (r *Registry) buildRoute(target netip.AddrPort, raw map[string]string, leases map[string]PSLease) Route {
	rt := Route{Target: target, Backends: make([]Backend, 0, len(raw))}
	for psID, v := range raw {
		e, err := decodeEntry(v)
		if err != nil {
			r.log.Warn("ignoring malformed backend", "target", target.String(), "ps_id", psID, "err", err)
			continue
		}
		l := leases[psID]
		addr, ok := backendAddress(e, l)
		if !ok {
			continue
		}
		b := Backend{PSID: psID, AgentID: e.AgentID, Owner: e.Owner, ExpiresAt: l.ExpiresAt, Draining: l.State == PSDraining,
			Lost: e.Lost, Address: addr}
		rt.Backends = append(rt.Backends, b)
	}
	sort.Slice(rt.Backends, func(i, j int) bool { return rt.Backends[i].PSID < rt.Backends[j].PSID })
	return rt
}

// backendAddress is where a route entry sends its clients: the entry's
// own address (the PS address its port was assigned on) with its port,
// or, for an entry written without one (an older version), the lease's
// primary address. ok is false for a stale entry: its address is not
// among those its PS's lease advertises now, so it was published by an
// earlier instance of this id whose leftovers the new holder withdraws at
// its start, and that port on the new holder's addresses leads nowhere it
// chose. An unparsable address is stale too.
//
// Without a lease the entry's address is kept (invalid for an entry
// without one) with its port, so a reader that learns the lease later
// still knows where to go and can judge it then (see Mirror.viewLocked).
func backendAddress(e entry, l PSLease) (netip.AddrPort, bool) {
	if e.Addr == "" {
		return netip.AddrPortFrom(l.Addr, e.Port), true
	}
	a, err := netip.ParseAddr(e.Addr)
	if err != nil {
		return netip.AddrPort{}, false
	}
	if l.Addr.IsValid() && !l.HasAddr(a) {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a, e.Port), true
}

package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

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

// Snapshot reads route hashes in chunks of snapshotChunk targets, one
// pipeline each, up to snapshotParallel chunks at a time: Redis answers one
// chunk while this process decodes another, so the two overlap instead of
// each waiting in turn for the other.
const (
	snapshotChunk    = 2000
	snapshotParallel = 4
)

// readRoutes reads the route hashes of targets (skipping malformed targets)
// and joins them with leases. The routes come in the order of targets.
func (r *Registry) readRoutes(ctx context.Context, targets []string, leases map[string]PSLease) ([]Route, error) {
	parts := make([][]Route, (len(targets)+snapshotChunk-1)/snapshotChunk)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(snapshotParallel)
	for i := range parts {
		chunk := targets[i*snapshotChunk : min((i+1)*snapshotChunk, len(targets))]
		g.Go(func() error {
			rts, err := r.readRouteChunk(gctx, chunk, leases)
			parts[i] = rts
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	out := make([]Route, 0, n)
	for _, p := range parts {
		out = append(out, p...)
	}
	return out, nil
}

// readRouteChunk reads the route hashes of targets in one pipeline.
func (r *Registry) readRouteChunk(ctx context.Context, targets []string, leases map[string]PSLease) ([]Route, error) {
	pipe := r.rdb.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, 0, len(targets))
	parsed := make([]netip.AddrPort, 0, len(targets))
	for _, t := range targets {
		ap, err := netip.ParseAddrPort(t)
		if err != nil {
			r.log.Warn("ignoring malformed target in registry", "target", textclip.Short(t))
			continue
		}
		parsed = append(parsed, ap)
		cmds = append(cmds, pipe.HGetAll(ctx, r.keys.routeRaw(t)))
	}
	if len(cmds) == 0 {
		return nil, nil
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read routes: %w", err)
	}
	out := make([]Route, 0, len(cmds))
	for i, c := range cmds {
		rt := r.buildRoute(parsed[i], c.Val(), leases)
		if len(rt.Backends) > 0 {
			out = append(out, rt)
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
		e, err := parseEntry(v)
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
	if len(rt.Backends) > 1 {
		slices.SortFunc(rt.Backends, func(a, b Backend) int { return strings.Compare(a.PSID, b.PSID) })
	}
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

// parseEntry decodes a route entry as decodeEntry does. Entries are flat
// JSON objects of a few known fields, so it scans the usual ones by hand
// (encoding/json was a tenth of a full load's CPU time, with an allocation
// per field) and hands every other one, down to a single escape or
// non-ASCII byte, to decodeEntry: both read any entry the same way.
func parseEntry(raw string) (entry, error) {
	if e, ok := scanEntry(raw); ok && e.Port != 0 && e.AgentID != "" {
		return e, nil
	}
	return decodeEntry(raw)
}

// scanEntry reads raw as a JSON object whose keys are exactly entry's
// field names, whose strings hold printable ASCII without escapes, whose
// port is a plain integer of 0..65535 and whose lost is true or false. ok
// is false for anything else, valid JSON or not.
func scanEntry(raw string) (e entry, ok bool) {
	i := skipSpace(raw, 0)
	if i >= len(raw) || raw[i] != '{' {
		return e, false
	}
	i = skipSpace(raw, i+1)
	if i < len(raw) && raw[i] == '}' {
		return e, skipSpace(raw, i+1) == len(raw)
	}
	for {
		key, j, ok := scanPlainString(raw, i)
		if !ok {
			return e, false
		}
		i = skipSpace(raw, j)
		if i >= len(raw) || raw[i] != ':' {
			return e, false
		}
		i = skipSpace(raw, i+1)
		switch key {
		case "port":
			e.Port, j, ok = scanPort(raw, i)
		case "agent_id":
			e.AgentID, j, ok = scanPlainString(raw, i)
		case "owner":
			e.Owner, j, ok = scanPlainString(raw, i)
		case "addr":
			e.Addr, j, ok = scanPlainString(raw, i)
		case "lost":
			switch {
			case strings.HasPrefix(raw[i:], "true"):
				e.Lost, j, ok = true, i+4, true
			case strings.HasPrefix(raw[i:], "false"):
				e.Lost, j, ok = false, i+5, true
			default:
				ok = false
			}
		default:
			return e, false
		}
		if !ok {
			return e, false
		}
		i = skipSpace(raw, j)
		if i >= len(raw) {
			return e, false
		}
		switch raw[i] {
		case ',':
			i = skipSpace(raw, i+1)
		case '}':
			return e, skipSpace(raw, i+1) == len(raw)
		default:
			return e, false
		}
	}
}

// skipSpace returns the index of the first byte at or after i that is not
// JSON whitespace.
func skipSpace(s string, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
		i++
	}
	return i
}

// scanPlainString reads a JSON string at s[i] made of printable ASCII
// other than backslash, and returns it and the index after it.
func scanPlainString(s string, i int) (string, int, bool) {
	if i >= len(s) || s[i] != '"' {
		return "", i, false
	}
	for j := i + 1; j < len(s); j++ {
		switch c := s[j]; {
		case c == '"':
			return s[i+1 : j], j + 1, true
		case c == '\\' || c < 0x20 || c >= 0x7f:
			return "", i, false
		}
	}
	return "", i, false
}

// scanPort reads a JSON integer of 0..65535 at s[i] (no sign, fraction,
// exponent or leading zero) and returns it and the index after it.
func scanPort(s string, i int) (uint16, int, bool) {
	j, n := i, 0
	for j < len(s) && s[j] >= '0' && s[j] <= '9' {
		n = n*10 + int(s[j]-'0')
		if n > 65535 {
			return 0, i, false
		}
		j++
	}
	if j == i || (s[i] == '0' && j > i+1) {
		return 0, i, false
	}
	if j < len(s) && (s[j] == '.' || s[j] == 'e' || s[j] == 'E') {
		return 0, i, false
	}
	return uint16(n), j, true
}

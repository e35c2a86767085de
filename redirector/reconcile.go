package redirector

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/registry"
)

// MaxBackends is how many backends one route holds in the map.
const MaxBackends = len(bpf.RedirectRouteValue{}.Backends)

// Backend states in the route map (enum backend_state in redirect.c).
const (
	stateUnused   = uint8(bpf.RedirectBackendStateBACKEND_UNUSED)
	stateLive     = uint8(bpf.RedirectBackendStateBACKEND_LIVE)
	stateDraining = uint8(bpf.RedirectBackendStateBACKEND_DRAINING)
	stateDead     = uint8(bpf.RedirectBackendStateBACKEND_DEAD)
)

// RouteMap is the reconciler's view of the kernel route map: the only
// operations it needs, so that the reconciler is tested without root
// against a recording fake.
type RouteMap interface {
	// Put writes the entries. It goes on past a key it cannot write: its
	// error is then a KeyErrors naming each failed key (any other error
	// means no key is known written), wrapping ErrMapFull for a key
	// refused because the map is full.
	Put(keys []bpf.RedirectRouteKey, values []bpf.RedirectRouteValue) error
	// Delete removes the keys; missing keys are not an error. It goes on
	// past a key it cannot delete, as Put does.
	Delete(keys []bpf.RedirectRouteKey) error
	// Keys lists every key in the map.
	Keys() ([]bpf.RedirectRouteKey, error)
}

// Destroyer terminates established client sockets that were redirected to
// backends that are now dead.
type Destroyer interface {
	Destroy(ctx context.Context, backends []netip.AddrPort) (int, error)
}

// Why a route is kept out of the map: the reason label of
// tether_redirector_routes_skipped_total.
const (
	// SkipNotIPv4: the connect hooks redirect IPv4 and IPv4-mapped targets.
	SkipNotIPv4 = "not_ipv4"
	// SkipTargetNotAllowed: the target is outside --target-cidrs, or in a
	// special range (loopback, link-local, ...) that --target-cidrs does
	// not name (cidr.List.Permits).
	SkipTargetNotAllowed = "target_not_allowed"
)

// maxRemembered bounds the targets the reconciler remembers having
// skipped (a hostile registry could hold millions): up to it, each target
// is logged and counted once; past it, skips are counted every time they
// happen and no longer logged one by one.
const maxRemembered = 100000

// Reconciler turns the registry mirror's desired state into route map
// operations. It implements registry.Sink.
type Reconciler struct {
	m       RouteMap
	destroy Destroyer // may be nil
	log     *slog.Logger
	// targets is the operator's --target-cidrs; see WithTargets.
	targets cidr.List

	// wmu serialises the map writes of Replace, Update and Retry, so a
	// retry never writes a value an update has since replaced.
	wmu sync.Mutex
	mu  sync.Mutex
	// pending holds the routes the map should hold and does not (writes
	// that failed), for Retry; see reconcile_writes.go.
	pending map[bpf.RedirectRouteKey]pendingRoute
	// writeErrors counts failed writes by reason (WriteMapFull, WriteOther).
	writeErrors map[string]uint64
	// reported is the write state last logged (noteState), and when.
	reported   writeState
	reportedAt time.Time
	now        func() time.Time
	// live is the set of backend addresses some route currently holds as
	// live; when one leaves it by dying (not by draining or withdrawal),
	// the sockets redirected to it are destroyed.
	live    map[netip.AddrPort]int
	entries int
	// lastFullSync is when Replace last finished (WriteState.LastFullSync).
	lastFullSync time.Time
	// changeToMap is tether_redirector_change_to_map_seconds (see Update).
	changeToMap prometheus.Histogram
	// skipped counts skips by reason; remembered holds the targets already
	// logged and counted (up to maxRemembered).
	skipped        map[string]uint64
	remembered     map[netip.AddrPort]struct{}
	overflowLogged bool
}

// ReconcilerOption configures a Reconciler.
type ReconcilerOption func(*Reconciler)

// WithTargets sets the targets whose routes may enter the map (the
// redirector's --target-cidrs). Without it, or with an empty list, every
// target is allowed except those in special ranges (loopback, link-local,
// unspecified, multicast, broadcast); a special target is allowed only when
// a prefix of l lying inside its special range holds it (cidr.List.Permits).
func WithTargets(l cidr.List) ReconcilerOption {
	return func(r *Reconciler) { r.targets = l }
}

// NewReconciler returns a reconciler writing to m; destroy may be nil.
func NewReconciler(m RouteMap, destroy Destroyer, log *slog.Logger, opts ...ReconcilerOption) *Reconciler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Reconciler{m: m, destroy: destroy, log: log, live: map[netip.AddrPort]int{}, now: time.Now,
		pending: map[bpf.RedirectRouteKey]pendingRoute{}, writeErrors: map[string]uint64{WriteMapFull: 0, WriteOther: 0},
		skipped: map[string]uint64{SkipNotIPv4: 0, SkipTargetNotAllowed: 0}, remembered: map[netip.AddrPort]struct{}{},
		changeToMap: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tether_redirector_change_to_map_seconds",
			Help: "Time from a registry change (its change feed entry id, on Redis's clock) to the kernel route map write that applies it; one observation per batch of changes, for its oldest.",
			// 1 ms to ~4 s: a change should reach the map well under 100 ms.
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 13),
		})}
	for _, o := range opts {
		o(r)
	}
	return r
}

// ChangeLatency is the histogram of the time from a registry change to
// its map write (tether_redirector_change_to_map_seconds), to register.
func (r *Reconciler) ChangeLatency() prometheus.Collector { return r.changeToMap }

// Skipped returns how many targets were kept out of the map, by reason
// (SkipNotIPv4, SkipTargetNotAllowed). Each target counts once, however
// many resyncs see it (past maxRemembered targets, once per sighting).
func (r *Reconciler) Skipped() map[string]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]uint64, len(r.skipped))
	for k, v := range r.skipped {
		out[k] = v
	}
	return out
}

var _ registry.Sink = (*Reconciler)(nil)

// Entries is the number of routes the reconciler last knew in the map.
func (r *Reconciler) Entries() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.entries
}

// Replace makes the map hold exactly routes. Stale keys are deleted
// first, so that their room is free and no withdrawn route outlives a
// failed write; then every route is written, those already in the map
// first (an update of an existing key succeeds even in a full map). A
// route that cannot be written has its key deleted (see fail) and is
// retried later (Retry). The error is only for a map that cannot be
// listed: write failures are the reconciler's to report (Health, State),
// not the mirror's, which would log them on every resync.
func (r *Reconciler) Replace(ctx context.Context, routes []registry.RouteState) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	keys, vals := r.encodeAll(routes)
	have, err := r.m.Keys()
	if err != nil {
		return fmt.Errorf("list route map: %w", err)
	}
	present := make(map[bpf.RedirectRouteKey]struct{}, len(have))
	var stale []bpf.RedirectRouteKey
	if len(have) > 0 { // an empty map (a first start) has nothing stale
		want := make(map[bpf.RedirectRouteKey]struct{}, len(keys))
		for _, k := range keys {
			want[k] = struct{}{}
		}
		for _, k := range have {
			present[k] = struct{}{}
			if _, ok := want[k]; !ok {
				stale = append(stale, k)
			}
		}
	}
	r.mu.Lock()
	r.pending = map[bpf.RedirectRouteKey]pendingRoute{} // routes is the whole truth
	r.mu.Unlock()
	r.deleteKeys(stale)
	// Existing keys first: when the map is full, changed routes still get
	// their new value, and only new ones wait for room.
	ks, vs := existingFirst(keys, vals, present)
	r.putRoutes(ks, vs)
	r.mu.Lock()
	r.entries = len(keys) - r.pendingPutsLocked()
	r.lastFullSync = r.now()
	killed := r.trackLocked(routes, true)
	r.mu.Unlock()
	r.noteState()
	r.destroyDead(ctx, killed)
	return nil
}

// Update deletes the routes without backends, then writes the changed
// ones; see Replace for what happens to a route that cannot be written.
// When it freed room, routes waiting for it are retried at once.
func (r *Reconciler) Update(ctx context.Context, routes []registry.RouteState) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	var putK []bpf.RedirectRouteKey
	var putV []bpf.RedirectRouteValue
	var delK []bpf.RedirectRouteKey
	for _, rs := range routes {
		k, v, ok := r.encode(rs)
		if !ok {
			continue
		}
		if v == nil {
			delK = append(delK, k)
			continue
		}
		putK = append(putK, k)
		putV = append(putV, *v)
	}
	r.mu.Lock()
	for _, k := range append(delK[:len(delK):len(delK)], putK...) {
		delete(r.pending, k) // superseded by this newer desired state
	}
	r.mu.Unlock()
	deleted := r.deleteKeys(delK)
	written := r.putRoutes(putK, putV)
	r.observeChangeLatency(ctx)
	r.mu.Lock()
	r.entries += written - deleted // approximate between full loads
	killed := r.trackLocked(routes, false)
	waiting := len(r.pending) > 0
	r.mu.Unlock()
	if deleted > 0 && waiting {
		r.retryLocked()
	}
	r.noteState()
	r.destroyDead(ctx, killed)
	return nil
}

// observeChangeLatency records, for an update that comes from the change
// feed, how long ago its oldest change was written to the registry. The
// feed entry's time is Redis's wall clock and now is this host's, so clock
// skew between the two adds to (or hides) latency; a negative difference
// (this clock behind) counts as 0.
func (r *Reconciler) observeChangeLatency(ctx context.Context) {
	if at, ok := registry.ChangeTime(ctx); ok {
		r.changeToMap.Observe(max(r.now().Sub(at).Seconds(), 0))
	}
}

// trackLocked updates the live-backend census from routes and returns the
// backends that went from live to dead. With full set, routes is the whole
// state and the census is rebuilt.
func (r *Reconciler) trackLocked(routes []registry.RouteState, full bool) []netip.AddrPort {
	before := r.live
	if full {
		r.live = make(map[netip.AddrPort]int, len(before))
	}
	died := map[netip.AddrPort]bool{}
	for _, rs := range routes {
		for _, b := range rs.Backends {
			if b.Live {
				if !full {
					// A route turning live again cancels an earlier death.
					delete(died, b.Address)
				}
				r.live[b.Address]++
				continue
			}
			if !b.Draining && before[b.Address] > 0 {
				died[b.Address] = true
			}
		}
	}
	if !full {
		// Incremental: a backend that is dead in every updated route it
		// appears in, and was live before, is gone. Counting exactly per
		// route is not needed: liveness is per PS, so all its routes agree.
		for a := range died {
			delete(r.live, a)
		}
	}
	out := make([]netip.AddrPort, 0, len(died))
	for a := range died {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Compare(out[j]) < 0 })
	return out
}

// destroyDead destroys the client sockets redirected to the dead backends.
// A failure is logged and not returned: the map is already right, and the
// sockets time out on their own, so it must not fail the sync.
func (r *Reconciler) destroyDead(ctx context.Context, dead []netip.AddrPort) {
	if r.destroy == nil || len(dead) == 0 {
		return
	}
	n, err := r.destroy.Destroy(ctx, dead)
	if err != nil {
		r.log.Warn("could not destroy sockets of dead backends", "backends", len(dead), "err", err)
		return
	}
	r.log.Info("destroyed client sockets of dead backends", "backends", len(dead), "first", fmt.Sprint(dead[:min(len(dead), 8)]), "sockets", n)
}

func (r *Reconciler) encodeAll(routes []registry.RouteState) ([]bpf.RedirectRouteKey, []bpf.RedirectRouteValue) {
	keys := make([]bpf.RedirectRouteKey, 0, len(routes))
	vals := make([]bpf.RedirectRouteValue, 0, len(routes))
	for _, rs := range routes {
		k, v, ok := r.encode(rs)
		if !ok || v == nil {
			continue
		}
		keys = append(keys, k)
		vals = append(vals, *v)
	}
	return keys, vals
}

// encode turns a route into its map key and value; a nil value means the
// route has no backend and must be deleted. ok is false for a target that
// must not enter the map (see refusal); the route is then neither written
// nor deleted (a full load removes it, should an older policy have let it
// in).
func (r *Reconciler) encode(rs registry.RouteState) (bpf.RedirectRouteKey, *bpf.RedirectRouteValue, bool) {
	if reason := r.refusal(rs.Target); reason != "" {
		if len(rs.Backends) > 0 { // a withdrawal of a skipped route is no news
			r.skip(rs.Target, reason)
		}
		return bpf.RedirectRouteKey{}, nil, false
	}
	k, _ := EncodeKey(rs.Target)
	if len(rs.Backends) == 0 {
		return k, nil, true
	}
	var v bpf.RedirectRouteValue
	n := 0
	for _, b := range rs.Backends {
		if n == MaxBackends {
			break
		}
		a := b.Address.Addr().Unmap()
		if !a.Is4() {
			continue
		}
		v.Backends[n] = bpf.RedirectBackend{Addr: be32(a), Port: be16(b.Address.Port()), State: stateOf(b)}
		n++
	}
	if n == 0 {
		return k, nil, true
	}
	return k, &v, true
}

// refusal returns why target's route must stay out of the map, or "".
func (r *Reconciler) refusal(target netip.AddrPort) string {
	a := target.Addr().Unmap()
	switch {
	case !a.Is4():
		return SkipNotIPv4
	case !r.targets.Permits(a):
		return SkipTargetNotAllowed
	}
	return ""
}

// skip counts and logs a skipped target, once per target: the anti-entropy
// resync sees every route again each period, and a warning per resync
// would drown the log.
func (r *Reconciler) skip(target netip.AddrPort, reason string) {
	r.mu.Lock()
	if _, seen := r.remembered[target]; seen {
		r.mu.Unlock()
		return
	}
	r.skipped[reason]++
	remember := len(r.remembered) < maxRemembered
	if remember {
		r.remembered[target] = struct{}{}
	}
	overflow := !remember && !r.overflowLogged
	r.overflowLogged = r.overflowLogged || overflow
	r.mu.Unlock()
	switch {
	case overflow:
		r.log.Warn("skipping routes of more targets than are logged one by one; see tether_redirector_routes_skipped_total", "logged", maxRemembered)
	case !remember:
	case reason == SkipNotIPv4:
		r.log.Warn("skipping a route whose target is not IPv4 (the connect hooks redirect IPv4 and IPv4-mapped targets)", "target", target.String())
	default:
		r.log.Warn("skipping a route whose target --target-cidrs does not allow (loopback, link-local, unspecified, multicast and broadcast targets only when --target-cidrs names a range inside them)",
			"target", target.String(), "target_cidrs", strings.Join(r.targets.Strings(), ","))
	}
}

func stateOf(b registry.BackendState) uint8 {
	switch {
	case b.Draining:
		return stateDraining
	case b.Live:
		return stateLive
	default:
		return stateDead
	}
}

// EncodeKey is the route map key of an IPv4 (or IPv4-mapped) target.
func EncodeKey(t netip.AddrPort) (bpf.RedirectRouteKey, bool) {
	a := t.Addr().Unmap()
	if !a.Is4() {
		return bpf.RedirectRouteKey{}, false
	}
	return bpf.RedirectRouteKey{Addr: be32(a), Port: be16(t.Port())}, true
}

// DecodeKey is the target of a route map key.
func DecodeKey(k bpf.RedirectRouteKey) netip.AddrPort {
	return netip.AddrPortFrom(addrOf(k.Addr), portOf(k.Port))
}

// DecodeBackend is the address and state of a backend slot.
func DecodeBackend(b bpf.RedirectBackend) (netip.AddrPort, string) {
	st := map[uint8]string{stateUnused: "unused", stateLive: "live", stateDraining: "draining", stateDead: "dead"}[b.State]
	return netip.AddrPortFrom(addrOf(b.Addr), portOf(b.Port)), st
}

// The map holds addresses and ports in network byte order, as the socket
// does; in Go they are the native-endian reading of those bytes.
func be32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func be16(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func addrOf(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func portOf(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

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
	// Put writes the entries in one batch.
	Put(keys []bpf.RedirectRouteKey, values []bpf.RedirectRouteValue) error
	// Delete removes the keys in one batch; missing keys are not an error.
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

	mu sync.Mutex
	// live is the set of backend addresses some route currently holds as
	// live; when one leaves it by dying (not by draining or withdrawal),
	// the sockets redirected to it are destroyed.
	live    map[netip.AddrPort]int
	entries int
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
	r := &Reconciler{m: m, destroy: destroy, log: log, live: map[netip.AddrPort]int{},
		skipped: map[string]uint64{SkipNotIPv4: 0, SkipTargetNotAllowed: 0}, remembered: map[netip.AddrPort]struct{}{}}
	for _, o := range opts {
		o(r)
	}
	return r
}

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

// Replace makes the map hold exactly routes: a batch write of all of them,
// then the deletion of every key that is not among them.
func (r *Reconciler) Replace(ctx context.Context, routes []registry.RouteState) error {
	keys, vals := r.encodeAll(routes)
	want := make(map[bpf.RedirectRouteKey]struct{}, len(keys))
	for _, k := range keys {
		want[k] = struct{}{}
	}
	if err := r.m.Put(keys, vals); err != nil {
		return fmt.Errorf("write %d routes: %w", len(keys), err)
	}
	have, err := r.m.Keys()
	if err != nil {
		return fmt.Errorf("list route map: %w", err)
	}
	var stale []bpf.RedirectRouteKey
	for _, k := range have {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := r.m.Delete(stale); err != nil {
		return fmt.Errorf("delete %d stale routes: %w", len(stale), err)
	}
	r.mu.Lock()
	r.entries = len(keys)
	killed := r.trackLocked(routes, true)
	r.mu.Unlock()
	r.destroyDead(ctx, killed)
	return nil
}

// Update writes changed routes and deletes those without backends.
func (r *Reconciler) Update(ctx context.Context, routes []registry.RouteState) error {
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
	if err := r.m.Put(putK, putV); err != nil {
		return fmt.Errorf("write %d routes: %w", len(putK), err)
	}
	if err := r.m.Delete(delK); err != nil {
		return fmt.Errorf("delete %d routes: %w", len(delK), err)
	}
	r.mu.Lock()
	r.entries += len(putK) - len(delK) // approximate between full loads
	killed := r.trackLocked(routes, false)
	r.mu.Unlock()
	r.destroyDead(ctx, killed)
	return nil
}

// trackLocked updates the live-backend census from routes and returns the
// backends that went from live to dead. With full set, routes is the whole
// state and the census is rebuilt.
func (r *Reconciler) trackLocked(routes []registry.RouteState, full bool) []netip.AddrPort {
	before := r.live
	if full {
		r.live = map[netip.AddrPort]int{}
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
	r.log.Info("destroyed client sockets of dead backends", "backends", fmt.Sprint(dead), "sockets", n)
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

package redirector

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"time"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/registry"
)

// This file compares the kernel route map with what the registry says it
// should hold, for `tether redirector routes --check`. What "should hold"
// means is decided by the reconciler's own encoding (Reconciler.encode):
// the same --target-cidrs rules, the same IPv4-only targets and backends,
// the same four slots, the same states; only the input differs (a fresh
// registry snapshot instead of the mirror).

// Kinds of RouteDiff.
const (
	// DiffMissing: the registry has a route for the target that the map
	// lacks (its clients' connects go to the target as dialed and fail).
	DiffMissing = "missing"
	// DiffExtra: the map holds a route the registry has not, or one that
	// --target-cidrs does not allow.
	DiffExtra = "extra"
	// DiffBackends: both have the route, with other backends or states.
	DiffBackends = "backends"
)

// BackendSlot is a backend as the route map holds it.
type BackendSlot struct {
	Address netip.AddrPort `json:"address"`
	State   string         `json:"state"`
}

// RouteDiff is one target whose kernel entry differs from the registry's.
type RouteDiff struct {
	Target netip.AddrPort `json:"target"`
	Kind   string         `json:"kind"`
	// Registry is what the map should hold; Kernel what it holds.
	Registry []BackendSlot `json:"registry,omitempty"`
	Kernel   []BackendSlot `json:"kernel,omitempty"`
	// Details names each backend that differs, for DiffBackends.
	Details []string `json:"details,omitempty"`
}

// RouteCheck is the result of comparing the kernel map with the registry.
type RouteCheck struct {
	// RegistryRoutes counts the routes the map should hold, KernelRoutes
	// those it holds (both limited to the target asked for, if any).
	RegistryRoutes int         `json:"registry_routes"`
	KernelRoutes   int         `json:"kernel_routes"`
	Differences    []RouteDiff `json:"differences"`
}

// Snapshotter is the registry as the check reads it.
type Snapshotter interface {
	Snapshot(ctx context.Context) (registry.Snapshot, error)
}

// desiredEntries is what the reconciler would write for snap at now: the
// map key and value of every route it lets into the map. The registry's
// backends are judged as the mirror judges them (registry.Mirror's view):
// a backend whose PS has no lease has no address and is left out; live is
// a live lease and not reported lost; draining is the lease's state.
func desiredEntries(snap registry.Snapshot, now time.Time, targets cidr.List) map[bpf.RedirectRouteKey]bpf.RedirectRouteValue {
	rec := NewReconciler(nil, nil, slog.New(slog.DiscardHandler), WithTargets(targets))
	out := make(map[bpf.RedirectRouteKey]bpf.RedirectRouteValue, len(snap.Routes))
	for _, rt := range snap.Routes {
		rs := registry.RouteState{Target: rt.Target}
		for _, b := range rt.Backends {
			if !b.Address.Addr().IsValid() || b.Address.Port() == 0 {
				continue
			}
			rs.Backends = append(rs.Backends, registry.BackendState{
				PSID: b.PSID, Address: b.Address, AgentID: b.AgentID, Live: b.Live(now), Draining: b.Draining,
			})
		}
		// The mirror orders a route's backends by PS id, and so slots.
		sort.Slice(rs.Backends, func(i, j int) bool { return rs.Backends[i].PSID < rs.Backends[j].PSID })
		k, v, ok := rec.encode(rs)
		if ok && v != nil {
			out[k] = *v
		}
	}
	return out
}

// slotsOf lists a value's used slots, in slot order.
func slotsOf(v bpf.RedirectRouteValue) []BackendSlot {
	var out []BackendSlot
	for _, b := range v.Backends {
		if b.State == stateUnused {
			continue
		}
		a, st := DecodeBackend(b)
		if st == "" {
			st = fmt.Sprintf("state_%d", b.State)
		}
		out = append(out, BackendSlot{Address: a, State: st})
	}
	return out
}

// diffEntries compares the entries the map should hold (want) with those
// it holds (have), sorted by target. Backends are compared by address and
// state, not by slot: the programs pick among them whatever their order.
func diffEntries(want, have map[bpf.RedirectRouteKey]bpf.RedirectRouteValue) []RouteDiff {
	var out []RouteDiff
	for k, w := range want {
		h, ok := have[k]
		if !ok {
			out = append(out, RouteDiff{Target: DecodeKey(k), Kind: DiffMissing, Registry: slotsOf(w)})
			continue
		}
		if details := backendDiff(slotsOf(w), slotsOf(h)); len(details) > 0 {
			out = append(out, RouteDiff{Target: DecodeKey(k), Kind: DiffBackends, Registry: slotsOf(w), Kernel: slotsOf(h), Details: details})
		}
	}
	for k, h := range have {
		if _, ok := want[k]; !ok {
			out = append(out, RouteDiff{Target: DecodeKey(k), Kind: DiffExtra, Kernel: slotsOf(h)})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Target.Compare(out[j].Target) < 0 })
	return out
}

// backendDiff names each backend that is in one list only, or in both
// with another state, ordered by address.
func backendDiff(want, have []BackendSlot) []string {
	w := map[netip.AddrPort]string{}
	for _, b := range want {
		w[b.Address] = b.State
	}
	h := map[netip.AddrPort]string{}
	for _, b := range have {
		h[b.Address] = b.State
	}
	addrs := map[netip.AddrPort]struct{}{}
	for a := range w {
		addrs[a] = struct{}{}
	}
	for a := range h {
		addrs[a] = struct{}{}
	}
	sorted := make([]netip.AddrPort, 0, len(addrs))
	for a := range addrs {
		sorted = append(sorted, a)
	}
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Compare(sorted[j]) < 0 })
	var out []string
	for _, a := range sorted {
		ws, inW := w[a]
		hs, inH := h[a]
		switch {
		case inW && !inH:
			out = append(out, fmt.Sprintf("%s (%s) only in the registry", a, ws))
		case inH && !inW:
			out = append(out, fmt.Sprintf("%s (%s) only in the kernel map", a, hs))
		case ws != hs:
			out = append(out, fmt.Sprintf("%s is %s in the kernel map, %s in the registry", a, hs, ws))
		}
	}
	return out
}

// sameDiff reports whether two differences of one target say the same.
func sameDiff(a, b RouteDiff) bool {
	if a.Target != b.Target || a.Kind != b.Kind || len(a.Details) != len(b.Details) {
		return false
	}
	for i := range a.Details {
		if a.Details[i] != b.Details[i] {
			return false
		}
	}
	return len(a.Registry) == len(b.Registry) && len(a.Kernel) == len(b.Kernel)
}

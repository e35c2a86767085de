package redirector

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cidr"
)

// This file reads the kernel's route map back for `tether redirector
// routes`: every entry decoded (dotted quads, host-order ports, states by
// name) and joined with what the programs consult when they pick a backend:
// the PS deadline of its address (tether_ps_deadline) and its passive
// health mark (tether_suspect). It reads pins only, so it works whether or
// not a redirector runs.

// kernelEntry is a route map entry as the kernel holds it.
type kernelEntry struct {
	key bpf.RedirectRouteKey
	val bpf.RedirectRouteValue
}

// routeMapReader holds the pinned maps ReadRoutes consults; the optional
// ones are nil on an installation by a version without them.
type routeMapReader struct {
	routes, deadlines, suspects *ebpf.Map
	hold                        uint64 // passive health hold-down, ns (0: off)
}

// openRouteMaps opens the pinned maps read-only. The route map is
// required; the deadline, suspect and health config maps are optional.
func openRouteMaps(pinDir string) (*routeMapReader, error) {
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	routes, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.RedirectMapTetherRoutes), ro)
	if err != nil {
		return nil, fmt.Errorf("open pinned route map in %s (is the redirector installed?): %w", pinDir, permissionHint(err))
	}
	r := &routeMapReader{routes: routes}
	optional := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), ro)
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("open pinned %s: %w", name, err)
		}
		return m, nil
	}
	if r.deadlines, err = optional(bpf.RedirectMapTetherPsDeadline); err != nil {
		r.Close()
		return nil, err
	}
	if r.suspects, err = optional(bpf.HealthMapTetherSuspect); err != nil {
		r.Close()
		return nil, err
	}
	cfg, err := optional(bpf.HealthMapTetherHealthConfig)
	if err != nil {
		r.Close()
		return nil, err
	}
	if cfg != nil {
		defer cfg.Close()
		if err := cfg.Lookup(uint32(bpf.HealthHealthConfigSlotHEALTH_CFG_HOLD_NS), &r.hold); err != nil {
			r.Close()
			return nil, fmt.Errorf("read the suspect hold-down: %w", err)
		}
	}
	return r, nil
}

func (r *routeMapReader) Close() {
	for _, m := range []*ebpf.Map{r.routes, r.deadlines, r.suspects} {
		if m != nil {
			m.Close()
		}
	}
}

// entries reads the route map: every entry, or only target's when only is
// valid (none when the target has no entry).
func (r *routeMapReader) entries(only netip.AddrPort) ([]kernelEntry, error) {
	if only.IsValid() {
		k, ok := EncodeKey(only)
		if !ok {
			return nil, fmt.Errorf("target %s: the route map holds IPv4 targets only", only)
		}
		var v bpf.RedirectRouteValue
		err := r.routes.Lookup(&k, &v)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("look %s up in the route map: %w", only, err)
		}
		return []kernelEntry{{k, v}}, nil
	}
	var out []kernelEntry
	var e kernelEntry
	it := r.routes.Iterate()
	for it.Next(&e.key, &e.val) {
		out = append(out, e)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read the route map: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return DecodeKey(out[i].key).Compare(DecodeKey(out[j].key)) < 0 })
	return out, nil
}

// decode turns an entry into a KernelRoute, looking up each backend's PS
// deadline and suspect mark as the connect hooks would, at now (ns on
// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns).
func (r *routeMapReader) decode(e kernelEntry, now uint64) KernelRoute {
	kr := KernelRoute{Target: DecodeKey(e.key), Backends: []KernelBackend{}}
	for i, b := range e.val.Backends {
		if b.State == stateUnused {
			continue
		}
		addr, state := DecodeBackend(b)
		if state == "" {
			state = fmt.Sprintf("state_%d", b.State)
		}
		kb := KernelBackend{Slot: i, Address: addr, State: state, Usable: b.State == stateLive}
		if r.deadlines != nil {
			var dl uint64
			if err := r.deadlines.Lookup(b.Addr, &dl); err == nil {
				left := time.Duration(int64(dl) - int64(now)).Seconds()
				kb.DeadlineLeftSeconds = &left
				kb.Usable = kb.Usable && now < dl
			}
		}
		if r.suspects != nil {
			var at uint64
			bk := bpf.RedirectRouteKey{Addr: b.Addr, Port: b.Port}
			if err := r.suspects.Lookup(&bk, &at); err == nil {
				// Same test as redirect(): a mark stamped after now is fresh.
				m := &SuspectMark{WithinHoldDown: r.hold > 0 && (at >= now || now-at < r.hold)}
				if now > at {
					m.MarkedSecondsAgo = time.Duration(now - at).Seconds()
				}
				kb.Suspect = m
			}
		}
		kr.Backends = append(kr.Backends, kb)
	}
	return kr
}

// ReadRoutes reads the kernel route map pinned under pinDir, decoded:
// every route, or only target's when target is valid (an empty list when
// it has no entry), sorted by target.
func ReadRoutes(pinDir string, target netip.AddrPort) ([]KernelRoute, error) {
	r, err := openRouteMaps(pinDir)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	entries, err := r.entries(target)
	if err != nil {
		return nil, err
	}
	now := uint64(monotonicNow())
	out := make([]KernelRoute, 0, len(entries))
	for _, e := range entries {
		out = append(out, r.decode(e, now))
	}
	return out, nil
}

// CheckRoutes compares the kernel route map under pinDir with what the
// registry says it should hold under the redirector's --target-cidrs
// (targets): every route, or only target's when target is valid.
//
// The registry and the map are read one after the other, and a change the
// registry took in between (which a running redirector writes to the map
// within milliseconds) would look like a difference. So differences are
// read again after settle, and only those found the same both times are
// reported (settle 0 reports the first reading).
func CheckRoutes(ctx context.Context, pinDir string, reg Snapshotter, targets cidr.List, target netip.AddrPort, settle time.Duration) (RouteCheck, error) {
	r, err := openRouteMaps(pinDir)
	if err != nil {
		return RouteCheck{}, err
	}
	defer r.Close()
	first, err := r.check(ctx, reg, targets, target)
	if err != nil || len(first.Differences) == 0 || settle <= 0 {
		return first, err
	}
	select {
	case <-ctx.Done():
		return RouteCheck{}, ctx.Err()
	case <-time.After(settle):
	}
	second, err := r.check(ctx, reg, targets, target)
	if err != nil {
		return RouteCheck{}, err
	}
	seen := make(map[netip.AddrPort]RouteDiff, len(first.Differences))
	for _, d := range first.Differences {
		seen[d.Target] = d
	}
	lasting := second.Differences[:0]
	for _, d := range second.Differences {
		if prev, ok := seen[d.Target]; ok && sameDiff(prev, d) {
			lasting = append(lasting, d)
		}
	}
	second.Differences = lasting
	return second, nil
}

// check reads the registry, then the map, and compares them once.
func (r *routeMapReader) check(ctx context.Context, reg Snapshotter, targets cidr.List, target netip.AddrPort) (RouteCheck, error) {
	snap, err := reg.Snapshot(ctx)
	if err != nil {
		return RouteCheck{}, fmt.Errorf("read the registry: %w", err)
	}
	want := desiredEntries(snap, time.Now(), targets)
	entries, err := r.entries(target)
	if err != nil {
		return RouteCheck{}, err
	}
	have := make(map[bpf.RedirectRouteKey]bpf.RedirectRouteValue, len(entries))
	for _, e := range entries {
		have[e.key] = e.val
	}
	if target.IsValid() {
		k, _ := EncodeKey(target)
		w, ok := want[k]
		want = map[bpf.RedirectRouteKey]bpf.RedirectRouteValue{}
		if ok {
			want[k] = w
		}
	}
	return RouteCheck{RegistryRoutes: len(want), KernelRoutes: len(have), Differences: diffEntries(want, have)}, nil
}

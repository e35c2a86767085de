package redirector

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/tether-net/tether/bpf"
)

// This file holds what the reconciler does when the route map refuses a
// write: the key is deleted (fail closed), the route waits in pending and
// is retried, and the state is counted, logged on each change, and
// reported to /healthz and `tether redirector status`.

// ErrMapFull marks a write the route map refused because it already holds
// --map-size entries.
var ErrMapFull = errors.New("route map full")

// Why a route map write failed: the reason label of
// tether_redirector_route_write_errors_total.
const (
	WriteMapFull = "map_full"
	WriteOther   = "other"
)

// KeyError is one key a RouteMap could not write or delete: its index in
// the call's keys, and why.
type KeyError struct {
	Index int
	Err   error
}

// KeyErrors is the error of a Put or Delete that went on past the keys it
// could not write: every key not named here was written (or deleted).
type KeyErrors []KeyError

func (e KeyErrors) Error() string {
	if len(e) == 0 {
		return "no key failed"
	}
	if len(e) == 1 {
		return fmt.Sprintf("key %d: %v", e[0].Index, e[0].Err)
	}
	return fmt.Sprintf("%d keys failed, the first (key %d): %v", len(e), e[0].Index, e[0].Err)
}

// Unwrap lets errors.Is find ErrMapFull in any of the keys' errors.
func (e KeyErrors) Unwrap() []error {
	out := make([]error, len(e))
	for i, k := range e {
		out[i] = k.Err
	}
	return out
}

// failedKeys maps the indices of the keys err names to their errors; an
// error that is not a KeyErrors fails every one of the n keys.
func failedKeys(err error, n int) map[int]error {
	if err == nil {
		return nil
	}
	out := map[int]error{}
	var ke KeyErrors
	if errors.As(err, &ke) {
		for _, k := range ke {
			out[k.Index] = k.Err
		}
		return out
	}
	for i := range n {
		out[i] = err
	}
	return out
}

// pendingRoute is a key the map does not hold as it should: a route to
// write (value), or a stale key to delete (del).
type pendingRoute struct {
	value bpf.RedirectRouteValue
	del   bool
	err   error
}

// writeState is what the reconciler reports about failed writes.
type writeState struct {
	Pending int // keys not as they should be in the map
	Full    bool
	LastErr string
}

// WriteState is the reconciler's account of the route map's writes.
type WriteState struct {
	// Pending is how many routes the map should hold and does not (and
	// stale keys it could not delete), waiting for a retry.
	Pending int
	// Full is true while a route waits because the map is full.
	Full bool
	// Errors counts failed writes by reason (WriteMapFull, WriteOther).
	Errors map[string]uint64
	// LastErr is the error of one waiting route, "" when none waits.
	LastErr string
	// LastFullSync is when the last full load (Replace) finished writing
	// the map; zero before the first.
	LastFullSync time.Time
}

// State returns the reconciler's write state.
func (r *Reconciler) State() WriteState {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.stateLocked()
	errs := make(map[string]uint64, len(r.writeErrors))
	for k, v := range r.writeErrors {
		errs[k] = v
	}
	return WriteState{Pending: st.Pending, Full: st.Full, Errors: errs, LastErr: st.LastErr, LastFullSync: r.lastFullSync}
}

// Health is nil when every route is in the map as it should be, and
// otherwise says how many are not and why (for /healthz).
func (r *Reconciler) Health() error {
	r.mu.Lock()
	st := r.stateLocked()
	entries := r.entries
	r.mu.Unlock()
	switch {
	case st.Pending == 0:
		return nil
	case st.Full:
		return fmt.Errorf("route map full: %d routes not in the kernel map (it holds %d; raise --map-size); their clients' connects are not redirected", st.Pending, entries)
	default:
		return fmt.Errorf("%d routes not written to the kernel map, retrying: %s", st.Pending, st.LastErr)
	}
}

func (r *Reconciler) stateLocked() writeState {
	st := writeState{Pending: len(r.pending)}
	var last error
	for _, p := range r.pending {
		if errors.Is(p.err, ErrMapFull) {
			st.Full = true
		}
		if last == nil || st.Full && errors.Is(p.err, ErrMapFull) {
			last = p.err
		}
	}
	if last != nil {
		st.LastErr = last.Error()
	}
	return st
}

func (r *Reconciler) pendingPutsLocked() int {
	n := 0
	for _, p := range r.pending {
		if !p.del {
			n++
		}
	}
	return n
}

// existingFirst reorders keys and vals so that the keys in present come
// first, keeping their pairing.
func existingFirst(keys []bpf.RedirectRouteKey, vals []bpf.RedirectRouteValue, present map[bpf.RedirectRouteKey]struct{}) ([]bpf.RedirectRouteKey, []bpf.RedirectRouteValue) {
	if len(present) == 0 {
		return keys, vals // an empty map (a first start): nothing to put first
	}
	ks := make([]bpf.RedirectRouteKey, 0, len(keys))
	vs := make([]bpf.RedirectRouteValue, 0, len(vals))
	for pass := range 2 {
		for i, k := range keys {
			if _, ok := present[k]; ok == (pass == 0) {
				ks, vs = append(ks, k), append(vs, vals[i])
			}
		}
	}
	return ks, vs
}

// putRoutes writes the routes, going on past failed keys. A key that
// cannot be written is deleted, so that its old value (an older binding
// of that target) never stays behind: without a route the client's
// connect goes to the target as dialed and fails, rather than reach
// whatever now owns the old PS port. It waits in pending for a retry.
// putRoutes returns how many routes were written. Callers hold wmu.
func (r *Reconciler) putRoutes(keys []bpf.RedirectRouteKey, vals []bpf.RedirectRouteValue) int {
	if len(keys) == 0 {
		return 0
	}
	failed := failedKeys(r.m.Put(keys, vals), len(keys))
	if len(failed) == 0 {
		return len(keys)
	}
	idx := make([]int, 0, len(failed))
	for i := range failed {
		idx = append(idx, i)
	}
	sort.Ints(idx)
	drop := make([]bpf.RedirectRouteKey, len(idx))
	for j, i := range idx {
		drop[j] = keys[i]
	}
	undeleted := failedKeys(r.m.Delete(drop), len(drop))
	r.mu.Lock()
	defer r.mu.Unlock()
	for j, i := range idx {
		r.countLocked(failed[i])
		r.pending[keys[i]] = pendingRoute{value: vals[i], err: failed[i]}
		if err, ok := undeleted[j]; ok {
			// Neither written nor deleted: the old value may still route
			// this target. Nothing more can be done now; the retry
			// writes or deletes it, and the log says it loudly.
			r.log.Error("route map: could neither write nor delete a route; its old value may still be in the kernel map",
				"target", DecodeKey(keys[i]).String(), "write_err", failed[i], "delete_err", err)
		}
	}
	return len(keys) - len(failed)
}

// deleteKeys deletes keys, going on past failed ones, which wait in
// pending for a retry. It returns how many were deleted (or missing).
// Callers hold wmu.
func (r *Reconciler) deleteKeys(keys []bpf.RedirectRouteKey) int {
	if len(keys) == 0 {
		return 0
	}
	failed := failedKeys(r.m.Delete(keys), len(keys))
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, err := range failed {
		r.countLocked(err)
		r.pending[keys[i]] = pendingRoute{del: true, err: err}
	}
	return len(keys) - len(failed)
}

func (r *Reconciler) countLocked(err error) {
	if errors.Is(err, ErrMapFull) {
		r.writeErrors[WriteMapFull]++
	} else {
		r.writeErrors[WriteOther]++
	}
}

// Retry writes (or deletes) the keys that failed before. It stops at the
// first route the map refuses as full: every waiting route is absent from
// the map, so the others would be refused too, and a full map is then
// probed with one write per round, not one per waiting route.
func (r *Reconciler) Retry() {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	r.retryLocked()
	r.noteState()
}

// retryLocked is Retry; the caller holds wmu.
func (r *Reconciler) retryLocked() {
	r.mu.Lock()
	keys := make([]bpf.RedirectRouteKey, 0, len(r.pending))
	for k := range r.pending {
		keys = append(keys, k)
	}
	pend := r.pending
	r.mu.Unlock()
	// Deletions first (they make room), then in key order, so that which
	// routes get a full map's room is stable from round to round.
	sort.Slice(keys, func(i, j int) bool {
		if pend[keys[i]].del != pend[keys[j]].del {
			return pend[keys[i]].del
		}
		return DecodeKey(keys[i]).Compare(DecodeKey(keys[j])) < 0
	})
	for _, k := range keys {
		p := pend[k]
		var err error
		if p.del {
			err = r.m.Delete([]bpf.RedirectRouteKey{k})
		} else {
			err = r.m.Put([]bpf.RedirectRouteKey{k}, []bpf.RedirectRouteValue{p.value})
		}
		r.mu.Lock()
		if err == nil {
			delete(r.pending, k)
			if !p.del {
				r.entries++
			}
		} else {
			r.countLocked(err)
			p.err = err
			r.pending[k] = p
		}
		r.mu.Unlock()
		if err != nil && !p.del && errors.Is(err, ErrMapFull) {
			return
		}
	}
}

// reminderEvery is how often a lasting write failure is logged again.
const reminderEvery = 5 * time.Minute

// noteState logs the write state when it changed, and again every
// reminderEvery while something waits: once per change, not per retry.
func (r *Reconciler) noteState() {
	r.mu.Lock()
	st := r.stateLocked()
	prev, at := r.reported, r.reportedAt
	now := r.now()
	changed := st.Full != prev.Full || (st.Pending == 0) != (prev.Pending == 0)
	remind := st.Pending > 0 && now.Sub(at) >= reminderEvery
	if changed || remind {
		r.reported, r.reportedAt = st, now
	}
	entries := r.entries
	r.mu.Unlock()
	switch {
	case !changed && !remind:
	case st.Full:
		r.log.Error("route map full: routes are left out of the kernel map (their clients' connects are not redirected and fail) until room is made; raise --map-size",
			"routes_not_written", st.Pending, "routes_in_map", entries, "err", st.LastErr)
	case st.Pending > 0:
		r.log.Error("route map writes failing: routes are left out of the kernel map and retried",
			"routes_not_written", st.Pending, "err", st.LastErr)
	default:
		r.log.Info("route map writes recovered: every route is in the kernel map", "routes_in_map", entries)
	}
}

// RunRetries retries failed writes until ctx ends: after 1s, doubling up
// to 30s while routes keep waiting, back to 1s once none does.
func (r *Reconciler) RunRetries(ctx context.Context) {
	const first, most = time.Second, 30 * time.Second
	d := first
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.mu.Lock()
		waiting := len(r.pending) > 0
		r.mu.Unlock()
		if waiting {
			r.Retry()
			d = min(d*2, most)
		} else {
			d = first
		}
		t.Reset(d)
	}
}

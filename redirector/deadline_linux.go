package redirector

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/registry"
)

// psDeadlines keeps tether_ps_deadline: per PS address, the latest lease
// expiry the redirector saw for a PS there, plus --kernel-grace, on the
// clock of bpf_ktime_get_ns (CLOCK_MONOTONIC). redirect() stops picking a
// backend whose PS's deadline has passed, so the kernel map goes dead on
// its own when no redirector is left to refresh it.
//
// The leases are read from the registry every period rather than taken
// from the mirror: the mirror tells its sink about changes only, and a
// renewal changes nothing it reports; one read of every lease per period
// costs one round trip, and one map update per PS address.
type psDeadlines struct {
	m      *ebpf.Map
	reg    *registry.Registry
	grace  time.Duration
	log    *slog.Logger
	synced <-chan struct{} // closed once the route map holds a full load

	lastOK atomic.Int64 // unix ns of the last successful refresh
	errors atomic.Uint64
}

// period is how often the deadlines are refreshed: well within the grace,
// so a live PS's deadline never lapses while the redirector runs.
func (d *psDeadlines) period() time.Duration {
	return min(max(d.grace/4, 250*time.Millisecond), 10*time.Second)
}

// run refreshes the deadlines until ctx ends; the first refresh is at
// once, so a restart after a long stop revives live PSs without delay.
func (d *psDeadlines) run(ctx context.Context) {
	t := time.NewTicker(d.period())
	defer t.Stop()
	failing := false
	for {
		err := d.refresh(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			d.errors.Add(1)
			if !failing {
				d.log.Error("cannot refresh PS deadlines in the kernel map; without a refresh the kernel stops redirecting to a PS --kernel-grace after its lease", "err", err, "kernel_grace", d.grace)
			}
			failing = true
		default:
			if failing {
				d.log.Info("PS deadlines refreshed again")
			}
			failing = false
			d.lastOK.Store(time.Now().UnixNano())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refresh writes each PS address's deadline, and drops the entries of
// addresses without a lease whose deadline has passed.
func (d *psDeadlines) refresh(ctx context.Context) error {
	leases, err := d.reg.PSLeases(ctx)
	if err != nil {
		return fmt.Errorf("read PS leases: %w", err)
	}
	wall, mono := time.Now(), monotonicNow()
	latest := map[uint32]time.Time{}
	for _, l := range leases {
		a := l.Addr.Unmap()
		if !a.Is4() {
			continue
		}
		if k := be32(a); l.ExpiresAt.After(latest[k]) {
			latest[k] = l.ExpiresAt
		}
	}
	for k, exp := range latest {
		dl := mono + int64(exp.Sub(wall)+d.grace)
		v := uint64(max(dl, 1))
		if err := d.m.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write deadline of PS %s: %w", addrOf(k), err)
		}
	}
	d.collect(latest, uint64(mono))
	return nil
}

// collect deletes the entries of addresses without a lease whose deadline
// passed. Only once the route map holds a full load: an entry absent is
// not checked by redirect(), and before that load the map may still hold
// that address's backends from before a restart. After it, a PS without
// a lease has no backend in the map, and a passed deadline means its
// lease lapsed --kernel-grace ago.
func (d *psDeadlines) collect(keep map[uint32]time.Time, now uint64) {
	select {
	case <-d.synced:
	default:
		return
	}
	var k uint32
	var v uint64
	var drop []uint32
	it := d.m.Iterate()
	for it.Next(&k, &v) {
		if _, ok := keep[k]; !ok && v <= now {
			drop = append(drop, k)
		}
	}
	for i := range drop {
		_ = d.m.Delete(&drop[i])
	}
}

// healthy is nil unless refreshes have failed for half the grace: past
// the grace, the kernel would stop redirecting to live PSs.
func (d *psDeadlines) healthy() error {
	last := time.Unix(0, d.lastOK.Load())
	if age := time.Since(last); age > d.grace/2 {
		return fmt.Errorf("PS deadlines in the kernel map not refreshed for %v (--kernel-grace %v): redirection stops when they lapse", age.Round(time.Second), d.grace)
	}
	return nil
}

// monotonicNow is CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
func monotonicNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0 // cannot fail on Linux
	}
	return ts.Nano()
}

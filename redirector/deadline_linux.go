package redirector

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
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
//
// While the registry cannot be read, a redirector that is alive keeps
// extending the deadline of every PS address that was live at the last
// successful read (now + grace): an unreachable control plane must not
// stop the kernel from redirecting to PS nodes that are, as far as anyone
// can tell, alive. The deadlines exist for a redirector that is gone, not
// for one that is blind; the mirror keeps the routes as they are likewise.
type psDeadlines struct {
	m      *ebpf.Map
	reg    psLeaseReader
	grace  time.Duration
	log    *slog.Logger
	synced <-chan struct{} // closed once the route map holds a full load

	// live holds the PS addresses live at the last successful read: the
	// ones kept alive while the registry cannot be read. Only run's
	// goroutine touches it.
	live map[uint32]struct{}

	lastOK      atomic.Int64 // unix ns of the last successful map write (read or kept)
	lastRead    atomic.Int64 // unix ns of the last successful lease read
	outageSince atomic.Int64 // unix ns the current registry outage began, 0 when none
	errors      atomic.Uint64
}

// leaseAddrs is every address l advertises; a lease built without Addrs
// (tests, older writers) has its primary address only.
func leaseAddrs(l registry.PSLease) []netip.Addr {
	if len(l.Addrs) == 0 {
		return []netip.Addr{l.Addr}
	}
	return l.Addrs
}

// psLeaseReader is the registry as the deadlines use it.
type psLeaseReader interface {
	PSLeases(ctx context.Context) (map[string]registry.PSLease, error)
}

// period is how often the deadlines are refreshed: well within the grace,
// so a live PS's deadline never lapses while the redirector runs.
func (d *psDeadlines) period() time.Duration {
	return min(max(d.grace/4, 250*time.Millisecond), 10*time.Second)
}

// run refreshes the deadlines until ctx ends; the first refresh is at
// once, so a restart after a long stop revives live PSs without delay.
func (d *psDeadlines) run(ctx context.Context) {
	// The age healthy() judges counts from the start, not from 1970: a
	// /healthz asked before the first refresh has returned is not a failure.
	d.lastOK.CompareAndSwap(0, time.Now().UnixNano())
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
				d.log.Error("cannot write PS deadlines into the kernel map; without a refresh the kernel stops redirecting to a PS --kernel-grace after its lease", "err", err, "kernel_grace", d.grace)
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
// addresses without a lease whose deadline has passed. When the leases
// cannot be read, it keeps the addresses live at the last read alive
// instead (see keepAlive); its error is then only a failed map write.
func (d *psDeadlines) refresh(ctx context.Context) error {
	leases, err := d.reg.PSLeases(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return d.keepAlive(err)
	}
	if since := d.outageSince.Swap(0); since != 0 {
		d.log.Info("registry readable again: PS deadlines follow the leases again",
			"outage", time.Since(time.Unix(0, since)).Round(time.Millisecond))
	}
	d.lastRead.Store(time.Now().UnixNano())
	wall, mono := time.Now(), monotonicNow()
	// A PS may advertise several addresses (PSLease.Addrs, the primary
	// first); its backends are on any of them, so each gets the deadline.
	latest := map[uint32]time.Time{}
	live := make(map[uint32]struct{}, len(leases))
	for _, l := range leases {
		for _, a := range leaseAddrs(l) {
			if a = a.Unmap(); !a.Is4() {
				continue
			}
			k := be32(a)
			if l.ExpiresAt.After(latest[k]) {
				latest[k] = l.ExpiresAt
			}
			if l.Live(wall) {
				live[k] = struct{}{}
			}
		}
	}
	d.live = live
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

// keepAlive extends the deadline of every PS address live at the last
// successful read to now + grace, because the registry cannot be read
// (readErr). It logs the outage once. A deadline is only ever moved
// forward here, never back.
func (d *psDeadlines) keepAlive(readErr error) error {
	if d.outageSince.CompareAndSwap(0, time.Now().UnixNano()) {
		d.log.Warn("registry unreachable: keeping the kernel deadlines of the PS nodes live at the last read until it returns",
			"ps_addresses", len(d.live), "err", readErr)
	}
	now := monotonicNow()
	if d.live == nil {
		// No read has succeeded since this redirector started: keep what
		// the one before it left, the addresses whose deadline has not
		// passed yet (a restart during an outage must not end redirection).
		d.live = map[uint32]struct{}{}
		var k uint32
		var v uint64
		for it := d.m.Iterate(); it.Next(&k, &v); {
			if v > uint64(now) {
				d.live[k] = struct{}{}
			}
		}
	}
	dl := uint64(now + int64(d.grace))
	for k := range d.live {
		var cur uint64
		if err := d.m.Lookup(&k, &cur); err == nil && cur >= dl {
			continue
		}
		if err := d.m.Update(&k, &dl, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("keep deadline of PS %s while the registry is unreachable: %w", addrOf(k), err)
		}
	}
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

// healthy is nil unless the deadlines could not be written for half the
// grace: past the grace, the kernel would stop redirecting to live PSs. A
// registry outage alone is not a failure of this redirector (it keeps the
// deadlines of the PSs live at the last read, and the kernel redirects on):
// /healthz failing for it would make an orchestrator restart every
// redirector at once for a problem none of them has (see outage).
func (d *psDeadlines) healthy() error {
	last := time.Unix(0, d.lastOK.Load())
	if age := time.Since(last); age > d.grace/2 {
		return fmt.Errorf("PS deadlines in the kernel map not refreshed for %v (--kernel-grace %v): redirection stops when they lapse", age.Round(time.Second), d.grace)
	}
	return nil
}

// outage returns how long the registry has been unreadable for the
// deadlines, 0 while it is readable: for status and logs.
func (d *psDeadlines) outage() time.Duration {
	since := d.outageSince.Load()
	if since == 0 {
		return 0
	}
	return time.Since(time.Unix(0, since))
}

// monotonicNow is CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
func monotonicNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0 // cannot fail on Linux
	}
	return ts.Nano()
}

package redirector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
)

// socketDestroyer is a Destroyer that holds kernel resources.
type socketDestroyer interface {
	Destroyer
	Close() error
}

// newDestroyer loads the iter/tcp destroyer against the pinned maps in
// pinDir, or falls back to netlink SOCK_DESTROY when this kernel cannot
// load it (forceNetlink skips the attempt).
func newDestroyer(pinDir string, forceNetlink bool, log *slog.Logger) socketDestroyer {
	if !forceNetlink {
		spec, err := bpf.LoadDestroy()
		if err == nil {
			d := &iterDestroyer{log: log}
			err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}})
			if err == nil {
				return d
			}
		}
		log.Warn("bpf_sock_destroy is not available (needs Linux >= 6.5); destroying sockets of dead backends with netlink SOCK_DESTROY instead", "err", err)
	}
	return netlinkDestroyer{}
}

// iterDestroyer destroys redirected sockets with the iter/tcp program and
// bpf_sock_destroy. tether_dead, which the program reads, holds 1,024
// backends (its size is fixed by the pinned map of older versions), while
// one PS can serve tens of thousands: so the dead set goes through in
// chunks that fit. Each chunk is marked, one iterator pass destroys its
// sockets, and the marks are cleared before the next.
type iterDestroyer struct {
	mu   sync.Mutex
	objs bpf.DestroyObjects
	log  *slog.Logger
}

// destroyAttempts is how many passes a backend gets: a backend whose mark
// or pass failed goes into a later chunk, and is given up (and named in
// the error) only after this many.
const destroyAttempts = 3

// Destroy destroys every redirected socket connected to one of backends.
// It returns the sockets destroyed, and an error that says how many
// backends could not be processed (their sockets are left to time out)
// when some could not after destroyAttempts.
func (d *iterDestroyer) Destroy(ctx context.Context, backends []netip.AddrPort) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pending := make([]bpf.RedirectRouteKey, 0, len(backends))
	seen := make(map[bpf.RedirectRouteKey]bool, len(backends))
	for _, b := range backends {
		if k, ok := EncodeKey(b); ok && !seen[k] {
			seen[k] = true
			pending = append(pending, k)
		}
	}
	// Marks left by a pass that never cleared them (a crash between the
	// put and the delete) would take room from this one: start empty.
	if err := d.clearStale(); err != nil {
		d.log.Warn("could not clear stale marks in tether_dead; chunks are smaller", "err", err)
	}
	chunk := int(d.objs.TetherDead.MaxEntries())
	destroyed, passes := 0, 0
	var lastErr error
	for attempt := 1; attempt <= destroyAttempts && len(pending) > 0; attempt++ {
		var retry []bpf.RedirectRouteKey
		for len(pending) > 0 {
			if err := ctx.Err(); err != nil {
				return destroyed, fmt.Errorf("destroy sockets of dead backends: %d of %d backends not processed: %w", len(pending)+len(retry), len(seen), err)
			}
			n := min(chunk, len(pending))
			batch := pending[:n]
			pending = pending[n:]
			got, failed, err := d.pass(batch)
			destroyed += got
			passes++
			if err != nil {
				lastErr = err
			}
			retry = append(retry, failed...)
		}
		pending = retry
		if len(pending) > 0 && attempt < destroyAttempts {
			d.log.Warn("retrying socket destruction for dead backends", "backends", len(pending), "attempt", attempt+1, "err", lastErr)
		}
	}
	if len(pending) > 0 {
		return destroyed, fmt.Errorf("destroyed %d sockets in %d passes, but %d of %d dead backends could not be processed after %d attempts (their sockets are left to time out): %w",
			destroyed, passes, len(pending), len(seen), destroyAttempts, lastErr)
	}
	if passes > 1 {
		d.log.Debug("destroyed sockets of dead backends in chunks", "backends", len(seen), "passes", passes, "sockets", destroyed)
	}
	return destroyed, nil
}

// pass marks keys in tether_dead, runs the iterator once and clears the
// marks. It returns the sockets destroyed, and the keys to retry: those it
// could not mark, or all of them when the pass itself failed.
func (d *iterDestroyer) pass(keys []bpf.RedirectRouteKey) (int, []bpf.RedirectRouteKey, error) {
	one := uint8(1)
	marked := make([]bpf.RedirectRouteKey, 0, len(keys))
	var failed []bpf.RedirectRouteKey
	var putErr error
	for _, k := range keys {
		if err := d.objs.TetherDead.Put(&k, &one); err != nil {
			failed = append(failed, k)
			putErr = fmt.Errorf("mark dead backend %s: %w", DecodeKey(k), err)
			continue
		}
		marked = append(marked, k)
	}
	defer func() {
		for i := range marked {
			_ = d.objs.TetherDead.Delete(&marked[i])
		}
	}()
	if len(marked) == 0 {
		return 0, failed, putErr
	}
	// The program counts what it destroys; an unreadable counter only
	// spoils the number reported, not the destruction, so it reads as 0.
	before, _ := readCounter(d.objs.TetherCounters, bpf.RedirectCounterCOUNTER_DESTROYED)
	if err := runIter(d.objs.TetherDestroy); err != nil {
		// Destroying twice is harmless (a destroyed socket is gone from
		// the next pass), so the whole chunk is retried.
		return 0, append(failed, marked...), err
	}
	after, _ := readCounter(d.objs.TetherCounters, bpf.RedirectCounterCOUNTER_DESTROYED)
	return int(after - before), failed, putErr
}

// clearStale empties tether_dead.
func (d *iterDestroyer) clearStale() error {
	var k bpf.RedirectRouteKey
	var v uint8
	var stale []bpf.RedirectRouteKey
	it := d.objs.TetherDead.Iterate()
	for it.Next(&k, &v) {
		stale = append(stale, k)
	}
	var errs []error
	for i := range stale {
		if err := d.objs.TetherDead.Delete(&stale[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(append(errs, it.Err())...)
}

// runIter runs one pass of the tcp iterator prog over every socket.
func runIter(prog *ebpf.Program) error {
	it, err := link.AttachIter(link.IterOptions{Program: prog})
	if err != nil {
		return fmt.Errorf("attach tcp iterator: %w", err)
	}
	defer it.Close()
	rd, err := it.Open()
	if err != nil {
		return fmt.Errorf("open tcp iterator: %w", err)
	}
	defer rd.Close()
	// The program writes nothing; reading to EOF runs it over every socket.
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return fmt.Errorf("run tcp iterator: %w", err)
	}
	return nil
}

func (d *iterDestroyer) Close() error { return d.objs.Close() }

// netlinkDestroyer is the fallback for kernels without bpf_sock_destroy
// (< 6.5): SOCK_DESTROY through sock_diag. It cannot tell redirected sockets
// from others, so it destroys every IPv4 TCP socket of this network
// namespace connected to the dead backend (the backend is dead for them
// too), and it cannot reach AF_INET6 sockets dialing v4-mapped addresses.
type netlinkDestroyer struct{}

func (netlinkDestroyer) Destroy(_ context.Context, backends []netip.AddrPort) (int, error) {
	dead := map[netip.AddrPort]bool{}
	for _, b := range backends {
		dead[netip.AddrPortFrom(b.Addr().Unmap(), b.Port())] = true
	}
	socks, err := netlink.SocketDiagTCP(unix.AF_INET)
	if err != nil {
		return 0, fmt.Errorf("list tcp sockets: %w", err)
	}
	n := 0
	var errs []error
	for _, s := range socks {
		dst, ok := netip.AddrFromSlice(s.ID.Destination.To4())
		if !ok || !dead[netip.AddrPortFrom(dst, s.ID.DestinationPort)] {
			continue
		}
		local := &net.TCPAddr{IP: s.ID.Source, Port: int(s.ID.SourcePort)}
		remote := &net.TCPAddr{IP: s.ID.Destination, Port: int(s.ID.DestinationPort)}
		if err := netlink.SocketDestroy(local, remote); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

func (netlinkDestroyer) Close() error { return nil }

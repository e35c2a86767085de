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
			d := &iterDestroyer{}
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
// bpf_sock_destroy: it marks the dead backends in tether_dead, runs one
// pass of the iterator, and clears the marks.
type iterDestroyer struct {
	mu   sync.Mutex
	objs bpf.DestroyObjects
}

func (d *iterDestroyer) Destroy(_ context.Context, backends []netip.AddrPort) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var keys []bpf.RedirectRouteKey
	one := uint8(1)
	for _, b := range backends {
		k, ok := EncodeKey(b)
		if !ok {
			continue
		}
		if err := d.objs.TetherDead.Put(&k, &one); err != nil {
			return 0, fmt.Errorf("mark dead backend %s: %w", b, err)
		}
		keys = append(keys, k)
	}
	defer func() {
		for i := range keys {
			_ = d.objs.TetherDead.Delete(&keys[i])
		}
	}()
	// The program counts what it destroys; an unreadable counter only
	// spoils the number reported, not the destruction, so it reads as 0.
	before, _ := readCounter(d.objs.TetherCounters, bpf.RedirectCounterCOUNTER_DESTROYED)
	if err := runIter(d.objs.TetherDestroy); err != nil {
		return 0, err
	}
	after, _ := readCounter(d.objs.TetherCounters, bpf.RedirectCounterCOUNTER_DESTROYED)
	return int(after - before), nil
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

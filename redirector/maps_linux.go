package redirector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
)

// kernelRouteMap is the RouteMap on the real tether_routes map.
type kernelRouteMap struct{ m *ebpf.Map }

// NewKernelRouteMap wraps the loaded tether_routes map.
func NewKernelRouteMap(m *ebpf.Map) RouteMap { return kernelRouteMap{m} }

func (k kernelRouteMap) Put(keys []bpf.RedirectRouteKey, vals []bpf.RedirectRouteValue) error {
	const chunk = 10000
	for i := 0; i < len(keys); i += chunk {
		j := min(i+chunk, len(keys))
		if _, err := k.m.BatchUpdate(keys[i:j], vals[i:j], nil); err != nil {
			if !errors.Is(err, ebpf.ErrNotSupported) {
				return err
			}
			for n := i; n < j; n++ {
				if err := k.m.Update(&keys[n], &vals[n], ebpf.UpdateAny); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func (k kernelRouteMap) Delete(keys []bpf.RedirectRouteKey) error {
	// One by one: a batch delete stops at the first missing key.
	for i := range keys {
		if err := k.m.Delete(&keys[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

func (k kernelRouteMap) Keys() ([]bpf.RedirectRouteKey, error) {
	// Batch lookups read thousands of entries per system call; walking the
	// map key by key costs ~5 µs per route, seconds for a million.
	const chunk = 8192
	var out []bpf.RedirectRouteKey
	var cursor ebpf.MapBatchCursor
	keys := make([]bpf.RedirectRouteKey, chunk)
	vals := make([]bpf.RedirectRouteValue, chunk)
	for {
		n, err := k.m.BatchLookup(&cursor, keys, vals, nil)
		out = append(out, keys[:n]...)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return k.iterateKeys()
		}
		if err != nil {
			return nil, err
		}
	}
}

func (k kernelRouteMap) iterateKeys() ([]bpf.RedirectRouteKey, error) {
	var out []bpf.RedirectRouteKey
	var key bpf.RedirectRouteKey
	var val bpf.RedirectRouteValue
	it := k.m.Iterate()
	for it.Next(&key, &val) {
		out = append(out, key)
	}
	return out, it.Err()
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
	before, _ := Counters(d.objs.TetherCounters)
	it, err := link.AttachIter(link.IterOptions{Program: d.objs.TetherDestroy})
	if err != nil {
		return 0, fmt.Errorf("attach tcp iterator: %w", err)
	}
	defer it.Close()
	rd, err := it.Open()
	if err != nil {
		return 0, fmt.Errorf("open tcp iterator: %w", err)
	}
	defer rd.Close()
	// The program writes nothing; reading to EOF runs it over every socket.
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return 0, fmt.Errorf("run tcp iterator: %w", err)
	}
	after, _ := Counters(d.objs.TetherCounters)
	return int(after["sockets_destroyed"] - before["sockets_destroyed"]), nil
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

// Counters reads the per-CPU counters, summed over CPUs, by name.
func Counters(m *ebpf.Map) (map[string]uint64, error) {
	out := map[string]uint64{}
	for i := bpf.RedirectCounter(0); i < bpf.RedirectCounterCOUNTER_MAX; i++ {
		var per []uint64
		k := uint32(i)
		if err := m.Lookup(&k, &per); err != nil {
			return nil, fmt.Errorf("read counter %d: %w", i, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[counterName(i)] = sum
	}
	return out, nil
}

func counterName(c bpf.RedirectCounter) string {
	switch c {
	case bpf.RedirectCounterCOUNTER_REDIRECTED:
		return "redirected"
	case bpf.RedirectCounterCOUNTER_NO_ROUTE:
		return "no_route"
	case bpf.RedirectCounterCOUNTER_NO_BACKEND:
		return "no_live_backend"
	case bpf.RedirectCounterCOUNTER_PEER_REWRITTEN:
		return "getpeername_rewritten"
	case bpf.RedirectCounterCOUNTER_DESTROYED:
		return "sockets_destroyed"
	}
	return fmt.Sprintf("counter_%d", c)
}

// ReadStatus reads the pinned maps and links under pinDir.
func ReadStatus(pinDir string) (Status, error) {
	st := Status{PinDir: pinDir}
	routes, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "tether_routes"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return st, fmt.Errorf("open pinned route map in %s (is the redirector installed?): %w", pinDir, permissionHint(err))
	}
	defer routes.Close()
	keys, err := kernelRouteMap{routes}.Keys()
	if err != nil {
		return st, fmt.Errorf("count routes: %w", err)
	}
	st.Routes = len(keys)
	st.Capacity = routes.MaxEntries()
	counters, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "tether_counters"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return st, fmt.Errorf("open pinned counters: %w", err)
	}
	defer counters.Close()
	if st.Counters, err = Counters(counters); err != nil {
		return st, err
	}
	for _, h := range hooks {
		if l, err := link.LoadPinnedLink(filepath.Join(pinDir, h.name), nil); err == nil {
			st.Links = append(st.Links, h.name)
			l.Close()
		}
	}
	return st, nil
}

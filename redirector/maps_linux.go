package redirector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

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
	prog *ebpf.Program
	dead *ebpf.Map
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
		if err := d.dead.Put(&k, &one); err != nil {
			return 0, fmt.Errorf("mark dead backend %s: %w", b, err)
		}
		keys = append(keys, k)
	}
	defer func() {
		for i := range keys {
			_ = d.dead.Delete(&keys[i])
		}
	}()
	it, err := link.AttachIter(link.IterOptions{Program: d.prog})
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
	return -1, nil // the count is in the tether_counters "destroyed" slot
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

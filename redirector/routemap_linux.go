package redirector

import (
	"errors"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/bpf"
)

// kernelRouteMap is the RouteMap on the real route map (tether_routes).
type kernelRouteMap struct{ m *ebpf.Map }

// NewKernelRouteMap wraps the loaded route map (tether_routes).
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

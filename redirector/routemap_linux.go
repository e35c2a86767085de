package redirector

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
)

// kernelRouteMap is the RouteMap on the real route map (tether_routes).
type kernelRouteMap struct{ m *ebpf.Map }

// NewKernelRouteMap wraps the loaded route map (tether_routes).
func NewKernelRouteMap(m *ebpf.Map) RouteMap { return kernelRouteMap{m} }

// Put writes in batches; a batch stops at the first key the kernel
// refuses, which is recorded, and the next batch starts after it.
func (k kernelRouteMap) Put(keys []bpf.RedirectRouteKey, vals []bpf.RedirectRouteValue) error {
	const chunk = 10000
	var failed KeyErrors
	for i := 0; i < len(keys); {
		j := min(i+chunk, len(keys))
		n, err := k.m.BatchUpdate(keys[i:j], vals[i:j], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for ; i < j; i++ {
				if err := k.m.Update(&keys[i], &vals[i], ebpf.UpdateAny); err != nil {
					failed = append(failed, KeyError{i, mapError(err)})
				}
			}
			continue
		}
		if err == nil {
			i = j
			continue
		}
		// keys[i:i+n] were written; keys[i+n] was refused.
		if n < 0 || i+n >= j {
			n = 0 // an unexpected count: retry the batch key by key
			for ; i < j; i++ {
				if err := k.m.Update(&keys[i], &vals[i], ebpf.UpdateAny); err != nil {
					failed = append(failed, KeyError{i, mapError(err)})
				}
			}
			continue
		}
		failed = append(failed, KeyError{i + n, mapError(err)})
		i += n + 1
	}
	if len(failed) > 0 {
		return failed
	}
	return nil
}

// mapError marks the errors of a full map with ErrMapFull: a hash map
// answers a new key with E2BIG ("key too big for map") once it holds
// max_entries (ENOSPC for some map types).
func mapError(err error) error {
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: %w", ErrMapFull, err)
	}
	return err
}

func (k kernelRouteMap) Delete(keys []bpf.RedirectRouteKey) error {
	// One by one: a batch delete stops at the first missing key.
	var failed KeyErrors
	for i := range keys {
		if err := k.m.Delete(&keys[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			failed = append(failed, KeyError{i, err})
		}
	}
	if len(failed) > 0 {
		return failed
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

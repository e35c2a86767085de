package ps

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrNoPorts means every port of the PS's range, on every advertise
// address, is in use or quarantined.
var ErrNoPorts = errors.New("no free port in range")

// PortRange is an inclusive range of ports, written "LO-HI".
type PortRange struct{ Lo, Hi uint16 }

// ParsePortRange parses "LO-HI".
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return PortRange{}, fmt.Errorf("port range %q: want LO-HI", s)
	}
	l, err1 := strconv.ParseUint(lo, 10, 16)
	h, err2 := strconv.ParseUint(hi, 10, 16)
	if err1 != nil || err2 != nil || l == 0 || l > h {
		return PortRange{}, fmt.Errorf("port range %q: want LO-HI with 1 <= LO <= HI <= 65535", s)
	}
	return PortRange{uint16(l), uint16(h)}, nil
}

// Size is the number of ports in r.
func (r PortRange) Size() int { return int(r.Hi) - int(r.Lo) + 1 }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Lo, r.Hi) }

// portAllocator hands out (address, port) pairs of the PS's advertise
// addresses and port range round-robin, so a released pair is reused as late
// as possible, and never while it is in use or quarantined. Quarantine is
// what keeps a stale mapping in some reader from reaching a different agent
// (docs/DESIGN.md, invariant 1).
//
// The pairs are walked port by port, each port on every address in turn,
// so several addresses fill evenly. The cursor is one index into that
// walk; used and quarantined pairs are the only per-pair state (a map entry
// each), so an idle range costs nothing.
type portAllocator struct {
	mu         sync.Mutex
	addrs      []netip.Addr
	r          PortRange
	next       int // index into the walk of the next candidate
	used       map[netip.AddrPort]struct{}
	quarantine map[netip.AddrPort]time.Time
	now        func() time.Time
}

func newPortAllocator(addrs []netip.Addr, r PortRange, now func() time.Time) *portAllocator {
	if now == nil {
		now = time.Now
	}
	return &portAllocator{addrs: addrs, r: r, used: map[netip.AddrPort]struct{}{}, quarantine: map[netip.AddrPort]time.Time{}, now: now}
}

// size is the number of pairs: addresses times ports.
func (a *portAllocator) size() int { return len(a.addrs) * a.r.Size() }

// pair is the i-th pair of the walk.
func (a *portAllocator) pair(i int) netip.AddrPort {
	n := len(a.addrs)
	return netip.AddrPortFrom(a.addrs[i%n], uint16(int(a.r.Lo)+i/n))
}

// allocate finds up to n free pairs, calling bind on each candidate; a
// candidate bind refuses (the OS says it is taken) is skipped. It returns
// fewer than n pairs, and ErrNoPorts, when the pairs run out.
//
// bind runs under the allocator's lock: with the per-port listeners that is
// a listen(2) per pair, with sk_lookup a map update.
func (a *portAllocator) allocate(n int, bind func(at netip.AddrPort) error) ([]netip.AddrPort, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	out := make([]netip.AddrPort, 0, n)
	size := a.size()
	for tried := 0; len(out) < n && tried < size; tried++ {
		at := a.pair(a.next)
		a.next = (a.next + 1) % size
		if _, ok := a.used[at]; ok {
			continue
		}
		if until, ok := a.quarantine[at]; ok {
			if now.Before(until) {
				continue
			}
			delete(a.quarantine, at)
		}
		if err := bind(at); err != nil {
			continue
		}
		a.used[at] = struct{}{}
		out = append(out, at)
	}
	if len(out) < n {
		return out, fmt.Errorf("%w %s on %d address(es) (%d wanted, %d found)", ErrNoPorts, a.r, len(a.addrs), n, len(out))
	}
	return out, nil
}

// release marks pairs as no longer used and quarantines them until until.
func (a *portAllocator) release(pairs []netip.AddrPort, until time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, at := range pairs {
		delete(a.used, at)
		if cur, ok := a.quarantine[at]; !ok || cur.Before(until) {
			a.quarantine[at] = until
		}
	}
}

// free returns pairs that were never published straight to the pool.
func (a *portAllocator) free(pairs []netip.AddrPort) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, at := range pairs {
		delete(a.used, at)
	}
}

// quarantineUntil merges quarantine records (from the registry) into the
// allocator; a later end wins.
func (a *portAllocator) quarantineUntil(q map[netip.AddrPort]time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for at, until := range q {
		if cur, ok := a.quarantine[at]; !ok || cur.Before(until) {
			a.quarantine[at] = until
		}
	}
}

// counts returns the number of used and quarantined pairs, dropping
// quarantine entries that have ended.
func (a *portAllocator) counts() (used, quarantined int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	for at, until := range a.quarantine {
		if !now.Before(until) {
			delete(a.quarantine, at)
		}
	}
	return len(a.used), len(a.quarantine)
}

// isUsed reports whether the pair at is allocated.
func (a *portAllocator) isUsed(at netip.AddrPort) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.used[at]
	return ok
}

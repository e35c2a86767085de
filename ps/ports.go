package ps

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrNoPorts means every port of the PS's range is in use or quarantined.
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

// portAllocator hands out ports of a range round-robin, so a released port
// is reused as late as possible, and never while it is in use or
// quarantined. Quarantine is what keeps a stale mapping in some reader from
// reaching a different agent (docs/DESIGN.md, invariant 1).
type portAllocator struct {
	mu         sync.Mutex
	r          PortRange
	next       int // offset into r of the next candidate
	used       map[uint16]struct{}
	quarantine map[uint16]time.Time
	now        func() time.Time
}

func newPortAllocator(r PortRange, now func() time.Time) *portAllocator {
	if now == nil {
		now = time.Now
	}
	return &portAllocator{r: r, used: map[uint16]struct{}{}, quarantine: map[uint16]time.Time{}, now: now}
}

// allocate finds up to n free ports, calling bind on each candidate; a
// candidate bind refuses (the OS says it is taken) is skipped. It returns
// fewer than n ports, and ErrNoPorts, when the range runs out.
func (a *portAllocator) allocate(n int, bind func(port uint16) error) ([]uint16, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	out := make([]uint16, 0, n)
	size := a.r.Size()
	for tried := 0; len(out) < n && tried < size; tried++ {
		port := uint16(int(a.r.Lo) + a.next)
		a.next = (a.next + 1) % size
		if _, ok := a.used[port]; ok {
			continue
		}
		if until, ok := a.quarantine[port]; ok {
			if now.Before(until) {
				continue
			}
			delete(a.quarantine, port)
		}
		if err := bind(port); err != nil {
			continue
		}
		a.used[port] = struct{}{}
		out = append(out, port)
	}
	if len(out) < n {
		return out, fmt.Errorf("%w %s (%d wanted, %d found)", ErrNoPorts, a.r, n, len(out))
	}
	return out, nil
}

// release marks ports as no longer used and quarantines them until until.
func (a *portAllocator) release(ports []uint16, until time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range ports {
		delete(a.used, p)
		if cur, ok := a.quarantine[p]; !ok || cur.Before(until) {
			a.quarantine[p] = until
		}
	}
}

// free returns ports that were never published straight to the pool.
func (a *portAllocator) free(ports []uint16) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range ports {
		delete(a.used, p)
	}
}

// quarantineUntil merges quarantine records (from the registry) into the
// allocator; a later end wins.
func (a *portAllocator) quarantineUntil(q map[uint16]time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for p, until := range q {
		if cur, ok := a.quarantine[p]; !ok || cur.Before(until) {
			a.quarantine[p] = until
		}
	}
}

// counts returns the number of used and quarantined ports, dropping
// quarantine entries that have ended.
func (a *portAllocator) counts() (used, quarantined int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	for p, until := range a.quarantine {
		if !now.Before(until) {
			delete(a.quarantine, p)
		}
	}
	return len(a.used), len(a.quarantine)
}

// isUsed reports whether port is allocated.
func (a *portAllocator) isUsed(port uint16) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.used[port]
	return ok
}

package redirector

import (
	"fmt"
	"time"

	"github.com/cilium/ebpf"
)

// The slots of tether_redirector_state (redirect.c): what the running
// redirector reports to `tether redirector status`, which reads pins only.
const (
	slotMapFull       uint32 = iota // 1 while routes wait because the route map is full
	slotPending                     // routes not in the map as they should be
	slotErrorsFull                  // route writes refused: map full
	slotErrorsOther                 // route writes failed otherwise
	slotUpdatedNs                   // CLOCK_MONOTONIC ns of this write
	slotKernelGraceNs               // --kernel-grace
	slotCount
)

// writeStateMap stores the reconciler's write state in the pinned state
// map, for `tether redirector status`.
func writeStateMap(m *ebpf.Map, st WriteState, grace time.Duration) error {
	vals := [slotCount]uint64{
		slotMapFull:       b2u(st.Full),
		slotPending:       uint64(st.Pending),
		slotErrorsFull:    st.Errors[WriteMapFull],
		slotErrorsOther:   st.Errors[WriteOther],
		slotUpdatedNs:     uint64(monotonicNow()),
		slotKernelGraceNs: uint64(grace),
	}
	for i, v := range vals {
		k := uint32(i)
		if err := m.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write redirector state slot %d: %w", i, err)
		}
	}
	return nil
}

// readStateMap is the state the last redirector wrote, or nil when none
// has (an installation by an older version, or none yet).
func readStateMap(m *ebpf.Map) (*WriteStatus, error) {
	var vals [slotCount]uint64
	for i := range vals {
		k := uint32(i)
		if err := m.Lookup(&k, &vals[i]); err != nil {
			return nil, fmt.Errorf("read redirector state slot %d: %w", i, err)
		}
	}
	if vals[slotUpdatedNs] == 0 {
		return nil, nil
	}
	age := time.Duration(monotonicNow() - int64(vals[slotUpdatedNs]))
	return &WriteStatus{
		MapFull:           vals[slotMapFull] != 0,
		RoutesNotWritten:  vals[slotPending],
		WriteErrors:       map[string]uint64{WriteMapFull: vals[slotErrorsFull], WriteOther: vals[slotErrorsOther]},
		UpdatedSecondsAgo: age.Seconds(),
		KernelGrace:       time.Duration(vals[slotKernelGraceNs]).String(),
	}, nil
}

// readDeadlines counts the PS addresses in tether_ps_deadline, and those
// whose deadline has passed (their backends are no longer picked).
func readDeadlines(m *ebpf.Map) (DeadlineStatus, error) {
	now := uint64(monotonicNow())
	var st DeadlineStatus
	var k uint32
	var v uint64
	it := m.Iterate()
	for it.Next(&k, &v) {
		st.PSAddresses++
		if v <= now {
			st.Lapsed = append(st.Lapsed, addrOf(k).String())
		}
	}
	return st, it.Err()
}

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

package redirector

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
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
	slotPID                         // the writing redirector's PID (in its own PID namespace)
	slotFullSyncNs                  // CLOCK_MONOTONIC ns of its last full sync (0: none yet)
	slotCount                       // 8: the map's max_entries, fixed by pinned maps of older versions
)

// heartbeatFresh is how old the state may be while its redirector still
// counts as running: it is written every second.
const heartbeatFresh = 3 * time.Second

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
		slotPID:           uint64(os.Getpid()),
	}
	if !st.LastFullSync.IsZero() {
		// time.Since reads the monotonic clock of LastFullSync.
		vals[slotFullSyncNs] = uint64(max(monotonicNow()-int64(time.Since(st.LastFullSync)), 1))
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
	now := monotonicNow()
	age := time.Duration(now - int64(vals[slotUpdatedNs]))
	ws := &WriteStatus{
		MapFull:           vals[slotMapFull] != 0,
		RoutesNotWritten:  vals[slotPending],
		WriteErrors:       map[string]uint64{WriteMapFull: vals[slotErrorsFull], WriteOther: vals[slotErrorsOther]},
		UpdatedSecondsAgo: age.Seconds(),
		KernelGrace:       time.Duration(vals[slotKernelGraceNs]).String(),
		PID:               int(vals[slotPID]),
	}
	if at := vals[slotFullSyncNs]; at != 0 {
		ago := time.Duration(now - int64(at)).Seconds()
		ws.LastFullSyncSecondsAgo = &ago
	}
	return ws, nil
}

// daemonStatus judges whether a redirector is running from the state it
// writes every second into the pinned state map (nil: none of this
// version ever wrote it).
//
// The heartbeat decides, not the PID: a redirector in a container has a
// PID of its own namespace, which means nothing (or another process) to a
// status run on the host, and PIDs are reused; CLOCK_MONOTONIC, the
// heartbeat's clock, is the same for every process of the host. The PID
// is shown, with whether a process of that PID exists here, to help find
// the process and its logs.
func daemonStatus(ws *WriteStatus) DaemonStatus {
	if ws == nil {
		return DaemonStatus{Verdict: "unknown: no redirector of this version has run with these pins"}
	}
	d := DaemonStatus{PID: ws.PID, HeartbeatSecondsAgo: &ws.UpdatedSecondsAgo, LastFullSyncSecondsAgo: ws.LastFullSyncSecondsAgo}
	d.Running = ws.UpdatedSecondsAgo < heartbeatFresh.Seconds()
	if ws.PID > 0 {
		// Signal 0 checks existence only; EPERM means it exists.
		err := unix.Kill(ws.PID, 0)
		d.PIDExistsHere = err == nil || errors.Is(err, unix.EPERM)
	}
	switch {
	case d.Running:
		d.Verdict = fmt.Sprintf("running (heartbeat %.1fs ago)", ws.UpdatedSecondsAgo)
	default:
		d.Verdict = fmt.Sprintf("not running: last heartbeat %s ago (redirection goes on with the pinned map; kernel deadlines lapse --kernel-grace after the leases)",
			time.Duration(ws.UpdatedSecondsAgo*float64(time.Second)).Round(time.Second))
	}
	return d
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

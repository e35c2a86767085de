package agent

import (
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// dialFailureEvery is how often a failing local target is logged: a dead
// service behind a busy agent fails every stream, and one line per
// stream would drown the log.
const dialFailureEvery = 10 * time.Second

// dialFailures logs failed dials of local targets at info, at most one
// line per target per interval, each line carrying how many failures of
// that target were left out since the previous one. A dead local service
// is the agent operator's problem to fix, so it is logged where that
// operator looks (the PS only counts the refusal). The targets are the
// exposed endpoints, so the map is bounded by the configuration.
type dialFailures struct {
	every time.Duration
	now   func() time.Time

	mu      sync.Mutex
	targets map[netip.AddrPort]*dialFailureState
}

type dialFailureState struct {
	logged     time.Time // when the last line for this target was written
	suppressed int       // failures since then that were not logged
}

func newDialFailures(every time.Duration, now func() time.Time) *dialFailures {
	return &dialFailures{every: every, now: now, targets: map[netip.AddrPort]*dialFailureState{}}
}

// failed records a failed dial of target (dialed at addr) and logs it
// unless a line for target was written within the interval.
func (d *dialFailures) failed(log *slog.Logger, target netip.AddrPort, addr, code string, err error) {
	now := d.now()
	d.mu.Lock()
	st, ok := d.targets[target]
	if !ok {
		st = &dialFailureState{}
		d.targets[target] = st
	}
	if ok && now.Sub(st.logged) < d.every {
		st.suppressed++
		d.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	st.logged, st.suppressed = now, 0
	d.mu.Unlock()
	log.Info("cannot reach local target: streams to it are refused", "target", target.String(), "dial", addr,
		"code", code, "err", err, "suppressed", suppressed, "log_every", d.every)
}

package daemon

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"
)

// Watchdog notices a loop that stopped running. The loop calls Beat each
// time round; Check fails once no beat came for longer than stallAfter.
// /healthz uses it so that a stuck process (a deadlock, a call that never
// returns, a runtime starved of CPU) is restarted rather than left serving
// nothing: the metrics handler itself may still answer while the daemon's
// loops are wedged, so answering is not proof of life.
type Watchdog struct {
	name       string
	stallAfter time.Duration
	last       atomic.Int64 // unix nanoseconds of the last beat
	now        func() time.Time
}

// NewWatchdog returns a watchdog for the loop called name, counted as
// having beaten now.
func NewWatchdog(name string, stallAfter time.Duration) *Watchdog {
	w := &Watchdog{name: name, stallAfter: stallAfter, now: time.Now}
	w.Beat()
	return w
}

// Beat records that the loop ran.
func (w *Watchdog) Beat() { w.last.Store(w.now().UnixNano()) }

// Check is nil while the loop beat within stallAfter.
func (w *Watchdog) Check() error {
	since := w.now().Sub(time.Unix(0, w.last.Load()))
	if since > w.stallAfter {
		return fmt.Errorf("%s stuck: no progress for %v (limit %v)", w.name, since.Round(time.Millisecond), w.stallAfter)
	}
	return nil
}

// Tick beats w every period until ctx ends: the process-wide watchdog, a
// goroutine that only runs when the Go scheduler still runs goroutines.
func (w *Watchdog) Tick(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.Beat()
		}
	}
}

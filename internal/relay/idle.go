package relay

import (
	"sync/atomic"
	"time"
)

// idleTimer closes a connection when no byte moved either way for its
// timeout. The copy loops only store a timestamp per read and write; the
// one timer per connection wakes once per timeout, and re-arms itself for
// the rest of the quiet period, so an active connection costs a wake-up
// per timeout, not work per byte or per tick. A nil *idleTimer is a valid
// timer that never fires.
type idleTimer struct {
	timeout time.Duration
	base    time.Time    // monotonic reference for last
	last    atomic.Int64 // time since base of the last byte moved
	done    atomic.Bool  // the join returned: stop re-arming
	expired atomic.Bool  // the timeout closed the connection
	t       *time.Timer
	onIdle  func()
	// moved, when set, is asked before the timer fires whether bytes
	// moved that the copy loops could not see (a kernel splice moves a
	// whole chunk before it returns): true counts as traffic now.
	moved func() bool
}

func newIdleTimer(timeout time.Duration, onIdle func()) *idleTimer {
	it := &idleTimer{timeout: timeout, base: time.Now(), onIdle: onIdle}
	it.t = time.AfterFunc(timeout, it.check)
	return it
}

// touch records that bytes moved now.
func (it *idleTimer) touch() {
	if it != nil {
		it.last.Store(int64(time.Since(it.base)))
	}
}

func (it *idleTimer) check() {
	if it.done.Load() {
		return
	}
	quiet := time.Since(it.base) - time.Duration(it.last.Load())
	if quiet < it.timeout {
		it.t.Reset(it.timeout - quiet)
		return
	}
	if it.moved != nil && it.moved() {
		it.touch()
		it.t.Reset(it.timeout)
		return
	}
	it.expired.Store(true)
	it.onIdle()
}

// fired reports whether the timeout closed the connection.
func (it *idleTimer) fired() bool { return it != nil && it.expired.Load() }

func (it *idleTimer) stop() {
	it.done.Store(true)
	it.t.Stop()
}

package tunnel

import (
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// streamSet is the open streams of one session, so that every one of them
// can be woken when the session dies.
//
// Why: in yamux v0.1.2, a Stream.Read (or a Write waiting for window)
// blocked when its session shuts down does not return; it spins. Its wait
// selects on the session's shutdown channel, which, once closed, is always
// ready, and then goes back to look at the stream's own state, which stays
// open until the session's Close gets round to force-closing its streams
// (after its receive loop has exited). A PS carrying a thousand client
// connections over a tunnel that dies has a thousand goroutines spinning
// there; on two cores they starved the whole process (its other tunnels'
// watchdogs and its lease renewal) for seconds. Upstream:
// hashicorp/yamux#176, not released.
//
// A stream whose deadline has passed leaves that loop at once with
// ErrTimeout (its wait also selects on the deadline's timer). So every
// stream of a session is registered here, and wake sets a past deadline on
// all of them: before the session is closed on purpose, and synchronously
// in the connection's first failed read or write, before yamux sees the
// error and shuts the session down.
type streamSet struct {
	mu   sync.Mutex
	open map[*yamux.Stream]struct{}
	dead bool
}

func newStreamSet() *streamSet { return &streamSet{open: map[*yamux.Stream]struct{}{}} }

// add tracks st; a stream added after wake is expired at once.
func (s *streamSet) add(st *yamux.Stream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		expire(st)
		return
	}
	s.open[st] = struct{}{}
}

// remove forgets st (it was closed).
func (s *streamSet) remove(st *yamux.Stream) {
	if s == nil {
		return
	}
	s.mu.Lock()
	delete(s.open, st)
	s.mu.Unlock()
}

// wake expires every open stream's deadlines, once: the session is dying
// and nothing more can be read or written on any of them.
func (s *streamSet) wake() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		return
	}
	s.dead = true
	for st := range s.open {
		expire(st)
	}
	s.open = nil
}

// expire sets a deadline in the past: blocked and later reads and writes
// on st return ErrTimeout at once (yamux also wakes the waiters).
func expire(st *yamux.Stream) { _ = st.SetDeadline(time.Unix(1, 0)) }

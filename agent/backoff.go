package agent

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// backoff computes reconnect delays: exponential growth from min to max,
// with full jitter (a uniform draw in [0, ceiling)), so that many agents
// that lost the same PS at the same moment come back spread over the whole
// interval instead of in lockstep.
type backoff struct {
	min, max time.Duration
	attempt  int
	rand     func() float64
	// floor is the share of the ceiling every delay waits at least: 0 is
	// full jitter; slow retries use 0.5 ("equal jitter"), so they are
	// never fast by chance.
	floor float64
}

func newBackoff(min, max time.Duration) *backoff {
	return &backoff{min: min, max: max, rand: rand.Float64}
}

// newSlowBackoff is the backoff of a slot that cannot be placed: the same
// growth to max, but each delay at least half its ceiling.
func newSlowBackoff(min, max time.Duration) *backoff {
	b := newBackoff(min, max)
	b.floor = 0.5
	return b
}

// ceiling is the upper bound of the next delay.
func (b *backoff) ceiling() time.Duration {
	d := b.min
	for i := 0; i < b.attempt && d < b.max; i++ {
		d *= 2
	}
	return min(d, b.max)
}

// next returns the delay before the next attempt and grows the ceiling.
func (b *backoff) next() time.Duration {
	d := time.Duration((b.floor + (1-b.floor)*b.rand()) * float64(b.ceiling()))
	if b.attempt < 64 {
		b.attempt++
	}
	return d
}

// reset starts over from min, after a session that stayed up.
func (b *backoff) reset() { b.attempt = 0 }

// after is the delay after a failure of any kind: a plain backoff treats
// them all alike.
func (b *backoff) after(error) time.Duration { return b.next() }

// retryDelays chooses the wait after each failure of a slot.
type retryDelays interface {
	// after returns the wait after err and advances the schedule.
	after(err error) time.Duration
	// reset starts over, after a session that stayed up.
	reset()
}

// slotBackoff keeps apart the two reasons a slot waits. A placement
// refusal (errOnlyOnePS: every PS reached already holds one of the
// agent's tunnels) is not a failure: the agent runs with fewer tunnels
// than wanted until another PS appears, so it retries slowly and on its
// own schedule. Anything else (a dial or handshake failure, a tunnel
// that ended) is a reconnect on the usual backoff, and ends a placement
// episode, so the next one starts from the beginning again.
type slotBackoff struct {
	reconnect, placement *backoff
}

func newSlotBackoff(min, max time.Duration) *slotBackoff {
	return &slotBackoff{reconnect: newBackoff(min, max), placement: newSlowBackoff(min, max)}
}

func (s *slotBackoff) after(err error) time.Duration {
	if errors.Is(err, errOnlyOnePS) {
		return s.placement.next()
	}
	s.placement.reset()
	return s.reconnect.next()
}

func (s *slotBackoff) reset() { s.reconnect.reset() }

// session is what keepConnected waits on: a tunnel until it ends.
type session interface {
	Done() <-chan struct{}
}

// keepConnected keeps one tunnel slot filled until ctx ends: it calls
// connect, serves the session with serve (which returns when the session
// is over), and waits a jittered backoff between attempts. The backoff
// starts over once a session stayed up for stable. onRetry is told about
// every wait.
func keepConnected[S session](ctx context.Context, bo retryDelays, stable time.Duration,
	connect func(context.Context) (S, error), serve func(context.Context, S),
	onRetry func(err error, wait time.Duration)) {
	for ctx.Err() == nil {
		s, err := connect(ctx)
		if err == nil {
			up := time.Now()
			serve(ctx, s)
			if ctx.Err() != nil {
				return
			}
			if time.Since(up) >= stable {
				bo.reset()
			}
			err = errSessionEnded
		}
		if ctx.Err() != nil {
			return
		}
		wait := bo.after(err)
		onRetry(err, wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

package agent

import (
	"context"
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
}

func newBackoff(min, max time.Duration) *backoff {
	return &backoff{min: min, max: max, rand: rand.Float64}
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
	d := time.Duration(b.rand() * float64(b.ceiling()))
	if b.attempt < 64 {
		b.attempt++
	}
	return d
}

// reset starts over from min, after a session that stayed up.
func (b *backoff) reset() { b.attempt = 0 }

// session is what keepConnected waits on: a tunnel until it ends.
type session interface {
	Done() <-chan struct{}
}

// keepConnected keeps one tunnel slot filled until ctx ends: it calls
// connect, serves the session with serve (which returns when the session
// is over), and waits a jittered backoff between attempts. The backoff
// starts over once a session stayed up for stable. onRetry is told about
// every wait.
func keepConnected[S session](ctx context.Context, bo *backoff, stable time.Duration,
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
		wait := bo.next()
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

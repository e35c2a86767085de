package agent

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

func TestBackoffGrowsToItsCapWithFullJitter(t *testing.T) {
	b := newBackoff(100*time.Millisecond, 2*time.Second)
	b.rand = func() float64 { return 0.999999 } // the top of each interval
	var got []time.Duration
	for range 8 {
		got = append(got, b.next().Round(time.Millisecond))
	}
	want := []time.Duration{100, 200, 400, 800, 1600, 2000, 2000, 2000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("ceilings %v, want %v ms", got, want)
		}
	}
	b.rand = func() float64 { return 0 }
	if d := b.next(); d != 0 {
		t.Fatalf("full jitter reaches down to 0, got %v", d)
	}
	b.reset()
	b.rand = func() float64 { return 0.5 }
	if d := b.next(); d != 50*time.Millisecond {
		t.Fatalf("after reset, got %v, want half of the minimum", d)
	}
}

// Many agents that lose their PS at the same moment must not come back in
// lockstep: their first retries spread over the whole first interval.
func TestBackoffSpreadsAgents(t *testing.T) {
	const agents = 1000
	buckets := make([]int, 10)
	for range agents {
		d := newBackoff(time.Second, 30*time.Second).next()
		buckets[int(d/(100*time.Millisecond))]++
	}
	for i, n := range buckets {
		if n < agents/10/2 {
			t.Fatalf("retries bunch up: bucket %d of the first second has %d of %d (%v)", i, n, agents, buckets)
		}
	}
}

type fakeSession struct{ done chan struct{} }

func (f *fakeSession) Done() <-chan struct{} { return f.done }

// keepConnected under a fake clock: failed attempts back off with growing
// ceilings, a session that stayed up resets the backoff, and a short one
// does not.
func TestKeepConnectedBacksOffAndResetsAfterAStableSession(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		bo := newBackoff(time.Second, 8*time.Second)
		bo.rand = func() float64 { return 0.999999 }
		// Script: fail 4 times, then a session of 1 minute, fail twice,
		// then a session of 2 s, fail once, then stop.
		type step struct {
			fail   bool
			uptime time.Duration
		}
		script := []step{{fail: true}, {fail: true}, {fail: true}, {fail: true}, {uptime: time.Minute},
			{fail: true}, {fail: true}, {uptime: 2 * time.Second}, {fail: true}}
		var attempts []time.Time
		var waits []time.Duration
		start := time.Now()
		i := 0
		keepConnected(ctx, bo, 30*time.Second,
			func(ctx context.Context) (*fakeSession, error) {
				attempts = append(attempts, time.Now())
				if i >= len(script) {
					cancel()
					return nil, ctx.Err()
				}
				s := script[i]
				i++
				if s.fail {
					return nil, errors.New("refused")
				}
				f := &fakeSession{done: make(chan struct{})}
				time.AfterFunc(s.uptime, func() { close(f.done) })
				return f, nil
			},
			func(ctx context.Context, s *fakeSession) { <-s.Done() },
			func(err error, wait time.Duration) { waits = append(waits, wait.Round(time.Second)) })
		want := []time.Duration{1, 2, 4, 8, 1, 2, 4, 8, 8}
		if len(waits) != len(want) {
			t.Fatalf("waits %v, want %v s", waits, want)
		}
		for k := range want {
			if waits[k] != want[k]*time.Second {
				t.Fatalf("waits %v, want %v s (reset only after the 1-minute session)", waits, want)
			}
		}
		// The fake clock shows the waits really happened between attempts.
		if gap := attempts[1].Sub(attempts[0]); gap.Round(time.Second) != time.Second {
			t.Fatalf("second attempt came %v after the first, want 1s", gap)
		}
		// 38 s of backoff plus 62 s of sessions, to the rounding of the
		// jitter draw.
		if total := time.Since(start).Round(time.Second); total != 100*time.Second {
			t.Fatalf("elapsed fake time %v, want 100s", total)
		}
	})
}

// keepConnected stops promptly when its context ends, even mid-backoff.
func TestKeepConnectedStopsDuringBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		bo := newBackoff(time.Hour, time.Hour)
		bo.rand = func() float64 { return 0.5 }
		done := make(chan struct{})
		go func() {
			keepConnected(ctx, bo, time.Minute,
				func(context.Context) (*fakeSession, error) { return nil, errors.New("down") },
				func(context.Context, *fakeSession) {},
				func(error, time.Duration) {})
			close(done)
		}()
		synctest.Wait() // blocked in its 30-minute backoff
		start := time.Now()
		cancel()
		<-done
		if d := time.Since(start); d != 0 {
			t.Fatalf("stopping took %v of fake time", d)
		}
	})
}

// A slot that cannot be placed waits on its own slow schedule: at least
// half of a ceiling that grows to the maximum. Placement refusals do not
// advance the reconnect backoff, and a real failure (or a tunnel that
// ended) starts the placement schedule over.
func TestSlotBackoffKeepsPlacementApart(t *testing.T) {
	s := newSlotBackoff(100*time.Millisecond, 2*time.Second)
	s.placement.rand = func() float64 { return 0 } // the bottom of each interval
	s.reconnect.rand = func() float64 { return 0.999999 }
	var got []time.Duration
	for range 7 {
		got = append(got, s.after(errOnlyOnePS).Round(time.Millisecond))
	}
	want := []time.Duration{50, 100, 200, 400, 800, 1000, 1000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("placement waits %v, want %v ms (half the ceiling at least)", got, want)
		}
	}
	if d := s.after(errors.New("dial refused")).Round(time.Millisecond); d != 100*time.Millisecond {
		t.Fatalf("first real failure after placement refusals waits %v, want the reconnect minimum 100ms", d)
	}
	if d := s.after(errOnlyOnePS).Round(time.Millisecond); d != 50*time.Millisecond {
		t.Fatalf("placement after a real failure waits %v, want to start over at 50ms", d)
	}
	if d := s.after(errSessionEnded).Round(time.Millisecond); d != 200*time.Millisecond {
		t.Fatalf("second real failure waits %v, want 200ms: placement refusals left the reconnect schedule alone", d)
	}
}

package jitter

import (
	"testing"
	"time"
)

func TestSpreadStaysInItsBandAndCoversIt(t *testing.T) {
	const d = time.Second
	lo, hi := d, time.Duration(0)
	for range 10000 {
		got := Spread(d, 0.2)
		if got < 800*time.Millisecond || got >= 1200*time.Millisecond {
			t.Fatalf("Spread(1s, 0.2) = %v, outside [0.8s, 1.2s)", got)
		}
		lo, hi = min(lo, got), max(hi, got)
	}
	// 10,000 draws over a 400 ms band: both ends are reached within 20 ms
	// unless the draw is not uniform at all.
	if lo > 820*time.Millisecond || hi < 1180*time.Millisecond {
		t.Fatalf("draws span only [%v, %v]", lo, hi)
	}
	if got := Spread(d, 0); got != d {
		t.Fatalf("Spread(d, 0) = %v, want d", got)
	}
	if got := Spread(d, 5); got < 0 || got >= 2*d {
		t.Fatalf("Spread(d, 5) = %v, want frac clamped to 1", got)
	}
}

package ps

import (
	"sync"
	"time"
)

// gate bounds handshakes: at most max run at once, and new ones start at
// most rate per second (with a burst). A handshake that finds the gate
// closed is refused as busy at once rather than queued, so ten thousand
// agents returning together cannot pile up goroutines and memory here; the
// agents' jittered backoff spreads them out.
type gate struct {
	sem chan struct{}

	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
	now    func() time.Time
}

func newGate(max int, rate float64, burst int, now func() time.Time) *gate {
	if now == nil {
		now = time.Now
	}
	return &gate{sem: make(chan struct{}, max), rate: rate, burst: float64(burst), tokens: float64(burst), last: now(), now: now}
}

// tryAcquire takes a handshake slot and a rate token, or returns false.
func (g *gate) tryAcquire() bool {
	select {
	case g.sem <- struct{}{}:
	default:
		return false
	}
	if !g.takeToken() {
		<-g.sem
		return false
	}
	return true
}

func (g *gate) takeToken() bool {
	if g.rate <= 0 {
		return true
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	g.tokens = min(g.burst, g.tokens+now.Sub(g.last).Seconds()*g.rate)
	g.last = now
	if g.tokens < 1 {
		return false
	}
	g.tokens--
	return true
}

// release returns a handshake slot.
func (g *gate) release() { <-g.sem }

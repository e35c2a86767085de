package ps

import (
	"net/netip"
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

// sourceLimit bounds the handshakes in progress from one source address,
// so that silent peers on one host cannot fill the gate and keep real
// agents out.
type sourceLimit struct {
	max int

	mu    sync.Mutex
	inUse map[netip.Addr]int
}

func newSourceLimit(max int) *sourceLimit {
	return &sourceLimit{max: max, inUse: map[netip.Addr]int{}}
}

func (l *sourceLimit) tryAcquire(a netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inUse[a] >= l.max {
		return false
	}
	l.inUse[a]++
	return true
}

func (l *sourceLimit) release(a netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inUse[a] <= 1 {
		delete(l.inUse, a)
		return
	}
	l.inUse[a]--
}

package registry

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// recordingSink keeps the state a Mirror pushed, as a map from target to
// backends, the way a real sink (a BPF map) would hold it.
type recordingSink struct {
	mu       sync.Mutex
	state    map[netip.AddrPort][]BackendState
	replaces int
	updates  int
	// updated holds, for every Update call, the targets it carried.
	updated [][]netip.AddrPort
}

func newRecordingSink() *recordingSink {
	return &recordingSink{state: map[netip.AddrPort][]BackendState{}}
}

func (s *recordingSink) Replace(_ context.Context, routes []RouteState) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.replaces++
	s.state = map[netip.AddrPort][]BackendState{}
	for _, r := range routes {
		if len(r.Backends) > 0 {
			s.state[r.Target] = r.Backends
		}
	}
	return nil
}

func (s *recordingSink) Update(_ context.Context, routes []RouteState) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.updates++
	targets := make([]netip.AddrPort, 0, len(routes))
	for _, r := range routes {
		targets = append(targets, r.Target)
		if len(r.Backends) == 0 {
			delete(s.state, r.Target)
		} else {
			s.state[r.Target] = r.Backends
		}
	}
	s.updated = append(s.updated, targets)
	return nil
}

func (s *recordingSink) get(t netip.AddrPort) []BackendState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state[t]
}

func (s *recordingSink) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.state)
}

// describe renders backends as "ps1=127.0.0.1:20001/live ps2=.../dead".
func describe(bs []BackendState) string {
	out := ""
	for _, b := range bs {
		st := "live"
		switch {
		case b.Draining:
			st = "draining"
		case !b.Live:
			st = "dead"
		}
		out += fmt.Sprintf("%s=%s/%s ", b.PSID, b.Address, st)
	}
	return out
}

func startMirror(t *testing.T, reg *Registry, sink Sink, resync time.Duration, now func() time.Time) *Mirror {
	t.Helper()
	m, err := NewMirror(MirrorConfig{Registry: reg, Sink: sink, Resync: resync, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("mirror run: %v", err)
		}
	})
	select {
	case <-m.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("mirror never became ready")
	}
	return m
}

func TestMirrorLoadsFollowsAndKeepsBackendsWhileBlind(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(5*time.Second)))
	_ = reg.RenewPS(ctx, lease("ps2", "127.0.0.2", clk.Now().Add(time.Hour)))
	before := ap("127.77.0.1:1")
	mustPublish(t, reg, "ps1", Publication{Target: before, Port: 20001, AgentID: "a1"})

	sink := newRecordingSink()
	m := startMirror(t, reg, sink, time.Hour, clk.Now)
	if got := describe(sink.get(before)); got != "ps1=127.0.0.1:20001/live " {
		t.Fatalf("full load: %q", got)
	}

	// A publication after the load arrives through the change feed.
	after := ap("127.77.0.1:2")
	mustPublish(t, reg, "ps1", Publication{Target: after, Port: 20002, AgentID: "a1"})
	mustPublish(t, reg, "ps2", Publication{Target: after, Port: 30002, AgentID: "a1"})
	testutil.Eventually(t, 5*time.Second, "change reaches the sink", func() error {
		if got := describe(sink.get(after)); got != "ps1=127.0.0.1:20002/live ps2=127.0.0.2:30002/live " {
			return fmt.Errorf("sink has %q", got)
		}
		return nil
	})
	if bs, ok := m.Lookup(after); !ok || len(bs) != 2 {
		t.Fatalf("lookup: %v %v", bs, ok)
	}

	// Redis goes away, and ps1's lease lapses on the wall clock: the mirror
	// cannot tell a PS that stopped renewing from renewals it cannot see,
	// so it keeps every backend as it was (leases are judged on a clock
	// that stands still while the registry is out of sight).
	rd.Stop()
	clk.Add(6 * time.Second)
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if got := describe(sink.get(after)); got != "ps1=127.0.0.1:20002/live ps2=127.0.0.2:30002/live " {
			t.Fatalf("an unreachable registry changed the sink: %q", got)
		}
		if bs, _ := m.Lookup(before); len(bs) != 1 || !bs[0].Live {
			t.Fatalf("an unreachable registry made a backend dead in lookups: %+v", bs)
		}
	}

	// Redis comes back; ps1 renews and withdraws one route: both show up.
	rd.Start()
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(time.Hour)))
	if err := reg.withdraw(ctx, "ps1", []Publication{{Target: before, Port: 20001}}, ""); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "catch up after Redis returns", func() error {
		if got := describe(sink.get(after)); got != "ps1=127.0.0.1:20002/live ps2=127.0.0.2:30002/live " {
			return fmt.Errorf("sink has %q", got)
		}
		if got := sink.get(before); len(got) != 0 {
			return fmt.Errorf("withdrawn route still in sink: %s", describe(got))
		}
		return nil
	})
}

func TestMirrorIgnoresPlainRenewals(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	if err := reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Hour))); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		mustPublish(t, reg, "ps1", Publication{Target: ap(fmt.Sprintf("127.77.0.1:%d", i+1)), Port: uint16(20000 + i), AgentID: "a1"})
	}
	sink := newRecordingSink()
	startMirror(t, reg, sink, time.Hour, nil)
	sink.mu.Lock()
	base := len(sink.updated)
	sink.mu.Unlock()
	for range 5 {
		if err := reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Hour))); err != nil {
			t.Fatal(err)
		}
	}
	// A marker change after the renewals proves they were read before we
	// look: the feed is ordered, so once the marker is in the sink every
	// renewal has been applied.
	marker := ap("127.77.9.9:1")
	mustPublish(t, reg, "ps1", Publication{Target: marker, Port: 29999, AgentID: "a1"})
	testutil.Eventually(t, 5*time.Second, "marker", func() error {
		if len(sink.get(marker)) == 0 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	sink.mu.Lock()
	defer sink.mu.Unlock()
	// A plain renewal changes nothing a reader acts on, so the only target
	// any update since the load may carry is the marker; renewals that
	// share a batch with it must not drag the 50 unchanged routes along.
	var sawMarker bool
	for i, targets := range sink.updated[base:] {
		for _, tg := range targets {
			if tg != marker {
				t.Fatalf("update %d after plain renewals carried unchanged route %s (%d targets in that update)", i, tg, len(targets))
			}
			sawMarker = true
		}
	}
	if !sawMarker {
		t.Fatalf("the marker reached the sink but no update since the load carried it: %v", sink.updated[base:])
	}
}

func TestMirrorResyncsAfterLosingTheFeed(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg, err := New(Config{URL: rd.URL(), StreamMaxLen: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Hour)))
	sink := newRecordingSink()
	startMirror(t, reg, sink, time.Hour, nil)
	rd.Stop()
	rd.Start()
	// Hundreds of changes while the reader may be between reads: the stream
	// keeps only a few, so following it alone cannot be enough.
	pubs := make([]Publication, 0, 400)
	for i := range 400 {
		pubs = append(pubs, Publication{Target: ap(fmt.Sprintf("127.77.2.1:%d", i+1)), Port: uint16(20000 + i), AgentID: "a1"})
	}
	mustPublish(t, reg, "ps1", pubs...)
	testutil.Eventually(t, 10*time.Second, "all 400 routes reach the sink", func() error {
		if n := sink.size(); n != 400 {
			return fmt.Errorf("sink has %d routes", n)
		}
		return nil
	})
}

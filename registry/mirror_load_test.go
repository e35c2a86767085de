package registry

import (
	"context"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"
)

// lastStateSink keeps what the mirror last handed it.
type lastStateSink struct {
	replaced []RouteState
	updated  []RouteState
}

func (s *lastStateSink) Replace(_ context.Context, routes []RouteState) error {
	s.replaced = routes
	return nil
}

func (s *lastStateSink) Update(_ context.Context, routes []RouteState) error {
	s.updated = routes
	return nil
}

// loadSnapshot is n routes on two PS nodes: every target on ps-b, every
// third also on ps-a (listed second, to check the mirror orders them).
func loadSnapshot(n int, now time.Time) *Snapshot {
	addrA, addrB := netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.0.2")
	snap := &Snapshot{Leases: map[string]PSLease{
		"ps-a": {ID: "ps-a", Addr: addrA, Addrs: []netip.Addr{addrA}, State: PSActive, ExpiresAt: now.Add(time.Hour)},
		"ps-b": {ID: "ps-b", Addr: addrB, Addrs: []netip.Addr{addrB}, State: PSDraining, ExpiresAt: now.Add(time.Hour)},
	}}
	for i := range n {
		rt := Route{Target: loadTarget(i), Backends: []Backend{
			{PSID: "ps-b", AgentID: "agent-" + strconv.Itoa(i%100), Address: netip.AddrPortFrom(addrB, uint16(1024+i%60000))},
		}}
		if i%3 == 0 {
			rt.Backends = append(rt.Backends, Backend{PSID: "ps-a", AgentID: "agent-a", Address: netip.AddrPortFrom(addrA, uint16(2048+i%60000))})
		}
		snap.Routes = append(snap.Routes, rt)
	}
	return snap
}

func loadTarget(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 9000)
}

// A full load costs a few allocations per load, not some per route: a map
// per target and a slice per view made a full load of 200,000 routes
// spend most of its time allocating and collecting (the redirector's
// start took 4.3 s for them, measured).
func TestMirrorFullLoadAllocatesPerLoadNotPerRoute(t *testing.T) {
	const n = 30000
	now := time.Now()
	snap := loadSnapshot(n, now)
	sink := &lastStateSink{}
	m, err := NewMirror(MirrorConfig{Registry: &Registry{now: time.Now}, Sink: sink})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	allocs := testing.AllocsPerRun(3, func() {
		if err := m.apply(ctx, message{snapshot: snap, started: now}); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("full load of %d routes: %.0f allocations (%.4f per route)", n, allocs, allocs/n)
	if perRoute := allocs / n; perRoute > 0.05 {
		t.Errorf("a full load of %d routes made %.0f allocations, %.3f per route; want it to allocate per load (at most 0.05 per route)", n, allocs, perRoute)
	}

	// And it hands over the right state.
	if len(sink.replaced) != n || m.Len() != n {
		t.Fatalf("sink got %d routes, mirror holds %d; want %d", len(sink.replaced), m.Len(), n)
	}
	byTarget := map[netip.AddrPort]RouteState{}
	for _, rs := range sink.replaced {
		byTarget[rs.Target] = rs
	}
	for _, i := range []int{0, 1, 2, 3, n - 1} {
		rs := byTarget[loadTarget(i)]
		want := []BackendState{{PSID: "ps-b", Address: snap.Routes[i].Backends[0].Address, AgentID: "agent-" + strconv.Itoa(i%100), Draining: true}}
		if i%3 == 0 {
			want = append([]BackendState{{PSID: "ps-a", Address: snap.Routes[i].Backends[1].Address, AgentID: "agent-a", Live: true}}, want...)
		}
		if !slices.Equal(rs.Backends, want) {
			t.Errorf("route %d: sink got %+v, want %+v", i, rs.Backends, want)
		}
		if got, _ := m.Lookup(loadTarget(i)); !slices.Equal(got, want) {
			t.Errorf("route %d: Lookup gives %+v, want %+v", i, got, want)
		}
	}
}

// The views of a full load share one backing array; a sink that appends
// to one view's backends must not write over another's.
func TestMirrorFullLoadViewsDoNotAlias(t *testing.T) {
	now := time.Now()
	sink := &lastStateSink{}
	m, err := NewMirror(MirrorConfig{Registry: &Registry{now: time.Now}, Sink: sink})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.apply(context.Background(), message{snapshot: loadSnapshot(100, now), started: now}); err != nil {
		t.Fatal(err)
	}
	before := make([][]BackendState, len(sink.replaced))
	for i, rs := range sink.replaced {
		before[i] = slices.Clone(rs.Backends)
	}
	for _, rs := range sink.replaced {
		_ = append(rs.Backends, BackendState{PSID: "intruder"})
	}
	for i, rs := range sink.replaced {
		if !slices.Equal(rs.Backends, before[i]) {
			t.Fatalf("route %s changed by an append to another route's backends: %+v, was %+v", rs.Target, rs.Backends, before[i])
		}
	}

	// Entries grown after a full load (a merge adds a PS to a target) do
	// not write over the next target's entries either.
	m.mu.Lock()
	t0, t1 := loadTarget(1), loadTarget(2)
	next := slices.Clone(m.entries[t1])
	m.mergeRouteLocked(Route{Target: t0, Backends: []Backend{{PSID: "ps-c", AgentID: "x", Address: netip.MustParseAddrPort("198.18.0.3:1")}}})
	got := m.entries[t1]
	m.mu.Unlock()
	if !slices.Equal(got, next) {
		t.Fatalf("merging a backend into %s changed %s's entries: %+v, was %+v", t0, t1, got, next)
	}
}

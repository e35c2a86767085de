package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/testutil"
)

// Leases in these tests: short, so an outage of several leases takes
// seconds; renewed four times per lease, as a PS renews five times.
const (
	testLease = time.Second
	testRenew = 250 * time.Millisecond
)

// psWriter renews a claimed PS lease every testRenew and, like a PS, puts
// its publications back at once when a renewal reports that the registry
// lost its data. Failures (Redis down) are retried at the next tick.
type psWriter struct {
	reg    *Registry
	id     string
	addr   netip.Addr
	pubs   []Publication
	cancel context.CancelFunc
	done   chan struct{}

	mu           sync.Mutex
	republished  int
	lastRepubErr error
}

func startWriter(t *testing.T, reg *Registry, id, addr string, pubs ...Publication) *psWriter {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &psWriter{reg: reg, id: id, addr: netip.MustParseAddr(addr), pubs: pubs, cancel: cancel, done: make(chan struct{})}
	if err := reg.ClaimPS(ctx, w.lease()); err != nil {
		t.Fatal(err)
	}
	mustPublish(t, reg, id, pubs...)
	go w.loop(ctx)
	t.Cleanup(w.stop)
	return w
}

func (w *psWriter) lease() PSLease {
	return PSLease{ID: w.id, Addr: w.addr, State: PSActive, TTL: testLease, Nonce: "nonce-" + w.id}
}

func (w *psWriter) loop(ctx context.Context) {
	defer close(w.done)
	tick := time.NewTicker(testRenew)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		rctx, cancel := context.WithTimeout(ctx, testLease)
		err := w.reg.RenewPS(rctx, w.lease())
		if errors.Is(err, ErrRegistryDataLost) {
			_, perr := w.reg.Publish(rctx, w.id, w.pubs)
			w.mu.Lock()
			w.republished++
			w.lastRepubErr = perr
			w.mu.Unlock()
		}
		cancel()
	}
}

// stop ends the writer as a crash would: the lease is left to lapse.
func (w *psWriter) stop() {
	w.cancel()
	<-w.done
}

// guardSink is a recordingSink that notes every call which leaves the
// guarded target without a live backend of the guarded PS.
type guardSink struct {
	*recordingSink
	target netip.AddrPort
	psID   string

	vmu        sync.Mutex
	violations []string
}

func (g *guardSink) check(call string) {
	bs := g.get(g.target)
	for _, b := range bs {
		if b.PSID == g.psID && b.Live {
			return
		}
	}
	g.vmu.Lock()
	g.violations = append(g.violations, fmt.Sprintf("%s at %s left %s with %q", call, time.Now().Format("15:04:05.000"), g.target, describe(bs)))
	g.vmu.Unlock()
}

func (g *guardSink) Replace(ctx context.Context, routes []RouteState) error {
	err := g.recordingSink.Replace(ctx, routes)
	g.check("Replace")
	return err
}

func (g *guardSink) Update(ctx context.Context, routes []RouteState) error {
	err := g.recordingSink.Update(ctx, routes)
	g.check("Update")
	return err
}

func (g *guardSink) problems() []string {
	g.vmu.Lock()
	defer g.vmu.Unlock()
	return append([]string(nil), g.violations...)
}

// syncBuf is a log destination safe for the mirror's goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startObservedMirror runs a Mirror with a logger and metrics the test
// can read.
func startObservedMirror(t *testing.T, reg *Registry, sink Sink) (*Mirror, *syncBuf, *prometheus.Registry) {
	t.Helper()
	logs := &syncBuf{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("mirror log:\n%s", logs.String())
		}
	})
	pr := prometheus.NewRegistry()
	m, err := NewMirror(MirrorConfig{Registry: reg, Sink: sink, Resync: time.Hour, Metrics: pr,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
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
	return m, logs, pr
}

// liveOf returns the live state of each of target's backends by PS id.
func liveOf(m *Mirror, target netip.AddrPort) map[string]bool {
	bs, _ := m.Lookup(target)
	out := map[string]bool{}
	for _, b := range bs {
		out[b.PSID] = b.Live
	}
	return out
}

// A registry outage of four leases kills no backend: lookups and the sink
// keep every backend live throughout, the outage and the recovery are
// logged once each and exported. A PS that died during the outage (never
// renews after it) is dead about one lease after Redis returns.
func TestMirrorKeepsBackendsThroughRegistryOutage(t *testing.T) {
	rd := testutil.StartRedis(t)
	writerReg := newTestRegistry(t, rd.URL(), nil)
	readerReg := newTestRegistry(t, rd.URL(), nil)
	target := ap("127.77.0.1:9100")
	survivor := startWriter(t, writerReg, "ps1", "127.0.0.1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	victim := startWriter(t, writerReg, "ps2", "127.0.0.2", Publication{Target: target, Port: 30001, AgentID: "a1"})
	_ = survivor

	sink := &guardSink{recordingSink: newRecordingSink(), target: target, psID: "ps1"}
	m, logs, pr := startObservedMirror(t, readerReg, sink)
	if got := describe(sink.get(target)); got != "ps1=127.0.0.1:20001/live ps2=127.0.0.2:30001/live " {
		t.Fatalf("full load: %q", got)
	}

	// Redis goes away for four leases, and ps2 dies meanwhile.
	rd.Stop()
	victim.stop()
	outage := 4 * testLease
	polls := 0
	for end := time.Now().Add(outage); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		polls++
		if live := liveOf(m, target); !live["ps1"] || !live["ps2"] {
			t.Fatalf("%v into the outage, a lookup saw %v: an unreachable registry must kill no backend", time.Since(end.Add(-outage)).Round(time.Millisecond), live)
		}
	}
	if got := gatherValue(t, pr, "tether_mirror_registry_reachable"); got != 0 {
		t.Errorf("tether_mirror_registry_reachable during the outage = %v, want 0", got)
	}
	if got := describe(sink.get(target)); got != "ps1=127.0.0.1:20001/live ps2=127.0.0.2:30001/live " {
		t.Fatalf("sink after the outage: %q", got)
	}

	rd.Start()
	back := time.Now()
	// ps1 renews; ps2 never does again. ps2 must lapse about one lease
	// after the mirror sees the registry again (its lease had at most one
	// lease left when the mirror went blind); ps1 must stay live.
	var ps2Dead time.Duration
	for ps2Dead == 0 {
		if time.Since(back) > 4*testLease+5*time.Second {
			t.Fatalf("ps2, dead since the outage, still live %v after Redis returned: %v", time.Since(back), liveOf(m, target))
		}
		live := liveOf(m, target)
		if !live["ps1"] {
			t.Fatalf("ps1 (renewing) went dead %v after Redis returned", time.Since(back))
		}
		if !live["ps2"] {
			ps2Dead = time.Since(back)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d lookups during the %v outage all live; ps2 (died in the outage) dead %v after Redis returned", polls, outage, ps2Dead.Round(time.Millisecond))
	testutil.Eventually(t, 5*time.Second, "sink marks ps2 dead", func() error {
		if got := describe(sink.get(target)); got != "ps1=127.0.0.1:20001/live ps2=127.0.0.2:30001/dead " {
			return fmt.Errorf("sink has %q", got)
		}
		return nil
	})
	if p := sink.problems(); len(p) > 0 {
		t.Fatalf("the sink was left without live ps1 %d times, first: %s", len(p), p[0])
	}

	log := logs.String()
	if n := strings.Count(log, "registry unreachable"); n != 1 {
		t.Errorf("want the outage logged once, got %d times", n)
	}
	if n := strings.Count(log, "registry reachable again"); n != 1 {
		t.Errorf("want the recovery logged once, got %d times", n)
	}
	if !strings.Contains(log, "outage=") {
		t.Errorf("the recovery log does not say how long the outage was:\n%s", log)
	}
	for name, want := range map[string]float64{
		"tether_mirror_registry_reachable":     1,
		"tether_mirror_registry_outages_total": 1,
		"tether_mirror_data_loss_total":        0,
	} {
		if got := gatherValue(t, pr, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// A FLUSHALL while a PS renews: the mirror notices the data loss within a
// feed read, never drops or kills the PS's backend, and the registry holds
// every route again within about one renewal, because the writer learns of
// the loss from its renewal and republishes at once.
func TestMirrorAndWriterRepairDataLoss(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	writerReg := newTestRegistry(t, rd.URL(), nil)
	readerReg := newTestRegistry(t, rd.URL(), nil)
	pubs := make([]Publication, 0, 20)
	for i := range 20 {
		pubs = append(pubs, Publication{Target: ap(fmt.Sprintf("127.77.3.1:%d", i+1)), Port: uint16(21000 + i), AgentID: "a1"})
	}
	target := pubs[0].Target
	w := startWriter(t, writerReg, "ps1", "127.0.0.1", pubs...)

	sink := &guardSink{recordingSink: newRecordingSink(), target: target, psID: "ps1"}
	m, logs, pr := startObservedMirror(t, readerReg, sink)
	before, err := readerReg.List(ctx)
	if err != nil || len(before) != len(pubs) {
		t.Fatalf("list before: %d routes, %v", len(before), err)
	}

	if err := readerReg.rdb.FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	flushed := time.Now()
	var whole time.Duration
	for whole == 0 {
		if time.Since(flushed) > 5*time.Second {
			t.Fatalf("registry not whole 5s after FLUSHALL")
		}
		if live := liveOf(m, target); !live["ps1"] {
			t.Fatalf("%v after FLUSHALL the mirror's lookup lost ps1: %v", time.Since(flushed), live)
		}
		if after, err := readerReg.List(ctx); err == nil && routesEqual(before, after) {
			whole = time.Since(flushed)
		}
		time.Sleep(20 * time.Millisecond)
	}
	testutil.Eventually(t, 5*time.Second, "data loss detected", func() error {
		if got := gatherValue(t, pr, "tether_mirror_data_loss_total"); got < 1 {
			return fmt.Errorf("tether_mirror_data_loss_total = %v", got)
		}
		return nil
	})
	// Through the repair window and the full load after it, the mirror
	// keeps all 20 routes.
	for end := time.Now().Add(2*minRepairWindow + time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if n := sink.size(); n != len(pubs) {
			t.Fatalf("sink holds %d routes, want %d", n, len(pubs))
		}
		if live := liveOf(m, target); !live["ps1"] {
			t.Fatalf("lookup lost ps1: %v", live)
		}
	}
	if !strings.Contains(logs.String(), "repair window over") {
		t.Errorf("the repair window never ended:\n%s", logs.String())
	}
	if p := sink.problems(); len(p) > 0 {
		t.Fatalf("the sink lost live ps1 %d times, first: %s", len(p), p[0])
	}
	w.mu.Lock()
	n, perr := w.republished, w.lastRepubErr
	w.mu.Unlock()
	if n < 1 || perr != nil {
		t.Fatalf("writer republished %d times (last error %v): the renewal must report the loss", n, perr)
	}
	t.Logf("FLUSHALL: registry whole again after %v; writer republished %d time(s)", whole.Round(time.Millisecond), n)
}

// routesEqual compares two List results by target, PS and address.
func routesEqual(a, b []Route) bool {
	key := func(rs []Route) string {
		var s strings.Builder
		for _, r := range rs {
			fmt.Fprintf(&s, "%s:", r.Target)
			for _, be := range r.Backends {
				fmt.Fprintf(&s, "%s=%s,", be.PSID, be.Address)
			}
			s.WriteString(";")
		}
		return s.String()
	}
	return key(a) == key(b)
}

// gatherValue reads a metric without labels from pr.
func gatherValue(t *testing.T, pr *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := pr.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name || len(mf.GetMetric()) == 0 {
			continue
		}
		m := mf.GetMetric()[0]
		switch {
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s not exported", name)
	return 0
}

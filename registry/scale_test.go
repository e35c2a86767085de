package registry

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/redisproc"
	"github.com/tether-net/tether/internal/testutil"
)

// usedMemory returns Redis's INFO memory used_memory in bytes.
func usedMemory(t *testing.T, reg *Registry) int64 {
	t.Helper()
	info, err := reg.rdb.Info(context.Background(), "memory").Result()
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("used_memory %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatalf("no used_memory in INFO memory:\n%s", info)
	return 0
}

// scriptMicros returns the total time (µs) Redis spent running scripts
// (EVALSHA and EVAL, from INFO commandstats): the registry's own cost,
// free of the client's scheduling, which is noisy on a busy host.
func scriptMicros(t *testing.T, reg *Registry) int64 {
	t.Helper()
	info, err := reg.rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for line := range strings.SplitSeq(info, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "cmdstat_evalsha:") && !strings.HasPrefix(line, "cmdstat_eval:") {
			continue
		}
		for f := range strings.SplitSeq(line[strings.IndexByte(line, ':')+1:], ",") {
			if v, ok := strings.CutPrefix(f, "usec="); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					t.Fatalf("commandstats %q: %v", line, err)
				}
				total += n
			}
		}
	}
	return total
}

// scalePubs returns n publications of one agent spread over the PS
// addresses addrs, each (address, port) distinct, as a PS assigns them.
func scalePubs(n int, agent string, addrs []netip.Addr, firstTarget int) []Publication {
	pubs := make([]Publication, n)
	for i := range pubs {
		t := firstTarget + i
		target := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(t >> 16), byte(t >> 8), byte(t)}), 9000)
		pubs[i] = Publication{Target: target, Addr: addrs[i%len(addrs)], Port: uint16(10000 + i/len(addrs)), AgentID: agent, Owner: "tok:0123abcd"}
	}
	return pubs
}

// TestPublishAtScale publishes one agent's 50,000 endpoints across four PS
// addresses in one Publish (what a PS does at a huge agent's handshake)
// and, while it runs, a small agent's 10 endpoints on another PS. It
// checks that every route reads back on its own (address, port), that the
// small registration was not held up behind the huge one (it finishes
// first), and logs the figures: endpoints/s, Redis memory per route, and
// the small registration's latency. TETHER_SCALE_ROUTES overrides 50,000.
func TestPublishAtScale(t *testing.T) {
	if testing.Short() {
		t.Skip("publishes 50,000 routes; skipped with -short")
	}
	n := 50000
	if v := os.Getenv("TETHER_SCALE_ROUTES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 100 {
			t.Fatalf("TETHER_SCALE_ROUTES=%q: want a number >= 100", v)
		}
	}
	ctx := context.Background()
	// Without persistence: testutil.StartRedis fsyncs the append-only file
	// on every write, which measures this host's disk, not the registry.
	srv, err := redisproc.Start(ctx, redisproc.Options{Bin: testutil.RequireBinary(t, "redis-server"), Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	reg := newTestRegistry(t, srv.URL(), time.Now)
	small := newTestRegistry(t, srv.URL(), time.Now)

	addrs := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("127.0.0.4")}
	until := time.Now().Add(time.Hour)
	if err := reg.RenewPS(ctx, PSLease{ID: "big", Addr: addrs[0], Addrs: addrs, State: PSActive, ExpiresAt: until}); err != nil {
		t.Fatal(err)
	}
	if err := reg.RenewPS(ctx, lease("small", "127.0.1.1", until)); err != nil {
		t.Fatal(err)
	}
	big := scalePubs(n, "huge", addrs, 0)
	tiny := scalePubs(10, "tiny", addrs[:1], n+1000)
	for i := range tiny {
		tiny[i].Addr = netip.MustParseAddr("127.0.1.1")
	}
	before, scriptsBefore := usedMemory(t, reg), scriptMicros(t, reg)

	var wg sync.WaitGroup
	var bigDone, smallDone time.Time
	var bigErr error
	started := make(chan struct{})
	start := time.Now()
	wg.Go(func() {
		close(started)
		var errs []error
		errs, bigErr = reg.Publish(ctx, "big", big)
		for i, e := range errs {
			if e != nil && bigErr == nil {
				bigErr = fmt.Errorf("publication %d: %w", i, e)
			}
		}
		bigDone = time.Now()
	})
	<-started
	// Let the huge registration get going before the small one asks.
	time.Sleep(50 * time.Millisecond)
	smallStart := time.Now()
	mustPublish(t, small, "small", tiny...)
	smallDone = time.Now()
	wg.Wait()
	if bigErr != nil {
		t.Fatal(bigErr)
	}
	elapsed := bigDone.Sub(start)
	after, scriptsAfter := usedMemory(t, reg), scriptMicros(t, reg)
	t.Logf("FIGURE publish %d routes over %d addresses: %v, %.0f endpoints/s", n, len(addrs), elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds())
	t.Logf("FIGURE redis script time per route: %.1f µs (both registrations)", float64(scriptsAfter-scriptsBefore)/float64(n+len(tiny)))
	t.Logf("FIGURE redis memory per route: %.0f bytes (used_memory %d -> %d)", float64(after-before)/float64(n+len(tiny)), before, after)
	t.Logf("FIGURE small registration (10 routes, other PS) during the huge one: %v (started %v after it)",
		smallDone.Sub(smallStart).Round(time.Microsecond), smallStart.Sub(start).Round(time.Millisecond))

	if !smallDone.Before(bigDone) {
		t.Errorf("the small registration (started %v in) finished %v after the huge one: it waited behind it",
			smallStart.Sub(start).Round(time.Millisecond), smallDone.Sub(bigDone).Round(time.Millisecond))
	}
	// The same small registration again, alone, for comparison.
	quietStart := time.Now()
	mustPublish(t, small, "small", tiny...)
	t.Logf("FIGURE small registration alone: %v", time.Since(quietStart).Round(time.Microsecond))
	// Where the bytes go: the PS's port index, the set of targets, the
	// change feed (per route), and one route hash.
	for _, k := range []string{reg.keys.psroutes("big"), reg.keys.targets(), reg.keys.changes()} {
		u, err := reg.rdb.MemoryUsage(ctx, k, 0).Result()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("FIGURE key %s: %.0f bytes per route", k, float64(u)/float64(n))
	}
	if u, err := reg.rdb.MemoryUsage(ctx, reg.keys.route(big[7].Target), 0).Result(); err == nil {
		t.Logf("FIGURE one route hash (key included): %d bytes", u)
	}
	routes, err := reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != n+len(tiny) {
		t.Fatalf("List: %d routes, want %d", len(routes), n+len(tiny))
	}
	seen := make(map[netip.AddrPort]netip.AddrPort, len(routes))
	for _, rt := range routes {
		if len(rt.Backends) != 1 {
			t.Fatalf("%s: %d backends, want 1", rt.Target, len(rt.Backends))
		}
		a := rt.Backends[0].Address
		if prev, dup := seen[a]; dup {
			t.Fatalf("%s and %s share the PS address %s", prev, rt.Target, a)
		}
		seen[a] = rt.Target
	}
	for _, p := range big[:100] {
		if got := seen[netip.AddrPortFrom(p.Addr, p.Port)]; got != p.Target {
			t.Fatalf("%s:%d reads back as %v, want %s", p.Addr, p.Port, got, p.Target)
		}
	}
	used, err := reg.PortsInUse(ctx, "big")
	if err != nil || len(used) != n {
		t.Fatalf("PortsInUse: %d records, %v; want %d", len(used), err, n)
	}
}

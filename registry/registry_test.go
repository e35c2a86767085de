package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// clock is a settable clock shared by a registry and a mirror in a test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTestRegistry(t *testing.T, url string, now func() time.Time) *Registry {
	t.Helper()
	reg, err := New(Config{URL: url, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return reg
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// lo is port on 127.0.0.1, the address of the leases most tests write.
func lo(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
}

func lease(id, addr string, until time.Time) PSLease {
	return PSLease{ID: id, Addr: netip.MustParseAddr(addr), State: PSActive, ExpiresAt: until}
}

// nearErr checks a time read back from the registry against the one
// written, both on the test's clock. Redis keeps them on its own clock, so
// the round trip back may make it early by up to a round trip (the reader
// errs early, never late) and the ms rounding late by a millisecond.
func nearErr(got, want time.Time) error {
	if d := got.Sub(want); d < -time.Second || d > 2*time.Millisecond {
		return fmt.Errorf("got %v, want %v (off by %v)", got, want, d)
	}
	return nil
}

func mustPublish(t *testing.T, reg *Registry, ps string, pubs ...Publication) {
	t.Helper()
	errs, err := reg.Publish(context.Background(), ps, pubs)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range errs {
		if e != nil {
			t.Fatalf("publication %d: %v", i, e)
		}
	}
}

func TestRouteHasOneBackendPerPSWithLeaseExpiry(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)

	until := clk.Now().Add(5 * time.Second)
	for _, l := range []PSLease{lease("ps1", "127.0.0.1", until), lease("ps2", "127.0.0.2", until)} {
		if err := reg.RenewPS(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	target := ap("127.77.0.1:9100")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	mustPublish(t, reg, "ps2", Publication{Target: target, Port: 30001, AgentID: "a1"})

	rt, err := reg.Get(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	if len(rt.Backends) != 2 || rt.Backends[0].Address != ap("127.0.0.1:20001") || rt.Backends[1].Address != ap("127.0.0.2:30001") {
		t.Fatalf("want backends on ps1 and ps2, got %+v", rt.Backends)
	}
	if err := nearErr(rt.Backends[0].ExpiresAt, until); err != nil {
		t.Errorf("expiry is the PS lease: %v", err)
	}

	// ps2's last renewal is for 300ms: once its lease lapses, Get no longer
	// returns it.
	if err := reg.RenewPS(ctx, lease("ps1", "127.0.0.1", until.Add(time.Minute))); err != nil {
		t.Fatal(err)
	}
	if err := reg.RenewPS(ctx, PSLease{ID: "ps2", Addr: netip.MustParseAddr("127.0.0.2"), TTL: 300 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "ps2's backend lapses", func() error {
		rt, err = reg.Get(ctx, target)
		if err != nil {
			return err
		}
		if len(rt.Backends) != 1 || rt.Backends[0].PSID != "ps1" {
			return fmt.Errorf("want only ps1's backend, got %+v", rt.Backends)
		}
		return nil
	})

	// A draining PS is not live either.
	if err := reg.RenewPS(ctx, PSLease{ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: PSDraining, ExpiresAt: until.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Get(ctx, target); !errors.Is(err, ErrNotFound) {
		t.Fatalf("want ErrNotFound with only a draining backend, got %v", err)
	}
}

func TestAnotherAgentCannotTakeALiveRoute(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	until := clk.Now().Add(5 * time.Second)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", until))
	_ = reg.RenewPS(ctx, lease("ps2", "127.0.0.2", until))
	target := ap("198.18.1.11:8080")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})

	errs, err := reg.Publish(ctx, "ps2", []Publication{
		{Target: target, Port: 30001, AgentID: "intruder"},
		{Target: ap("198.18.1.99:8080"), Port: 30002, AgentID: "intruder"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(errs[0], ErrConflict) {
		t.Fatalf("claiming a1's live route: want ErrConflict, got %v", errs[0])
	}
	if errs[1] != nil {
		t.Fatalf("an unrelated publication in the same batch must succeed: %v", errs[1])
	}
	rt, _ := reg.Get(ctx, target)
	if len(rt.Backends) != 1 || rt.Backends[0].AgentID != "a1" {
		t.Fatalf("the route changed hands: %+v", rt.Backends)
	}

	// Once a1's PS lease lapses (its last renewal ran out a second ago), the
	// target is free to take.
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(-time.Second)))
	mustPublish(t, reg, "ps2", Publication{Target: target, Port: 30001, AgentID: "a2"})
}

// An intruder refused on the same PS as the holder must not touch the
// holder's records: the holder's port stays indexed, so a restart of that
// PS withdraws and quarantines it (a port left unindexed would be handed
// to another agent while readers still map the target to it: a misroute
// the e2e suite saw after a claim, a kill -9 and a restart).
func TestARefusedClaimLeavesTheHoldersPortIndexed(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Minute)))
	target := ap("198.18.1.12:8080")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a2"})

	errs, err := reg.Publish(ctx, "ps1", []Publication{{Target: target, Port: 20002, AgentID: "intruder"}})
	if err != nil || !errors.Is(errs[0], ErrConflict) {
		t.Fatalf("the claim: %v %v, want ErrConflict", errs, err)
	}
	used, err := reg.PortsInUse(ctx, "ps1")
	if err != nil || used[lo(20001)] != target || len(used) != 1 {
		t.Fatalf("ports in use after a refused claim: %v %v, want only 20001 -> %s", used, err, target)
	}
	until := time.Now().Add(time.Minute)
	ports, err := reg.WithdrawAll(ctx, "ps1", until)
	if err != nil || len(ports) != 1 || ports[0] != lo(20001) {
		t.Fatalf("WithdrawAll after a refused claim: %v %v, want [20001]", ports, err)
	}
	if _, err := reg.Get(ctx, target); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the holder's route survived WithdrawAll: %v", err)
	}
	q, err := reg.Quarantined(ctx, "ps1")
	if _, ok := q[lo(20001)]; err != nil || !ok {
		t.Fatalf("quarantine after WithdrawAll: %v %v, want 20001", q, err)
	}
}

func TestWithdrawOnlyRemovesTheMatchingPort(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Minute)))
	target := ap("127.77.0.1:9100")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	// The agent reconnected and got a new port; a late withdraw of the old
	// one must not remove the new publication.
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20002, AgentID: "a1"})
	if err := reg.withdraw(ctx, "ps1", []Publication{{Target: target, Port: 20001}}, ""); err != nil {
		t.Fatal(err)
	}
	rt, err := reg.Get(ctx, target)
	if err != nil || rt.Backends[0].Address.Port() != 20002 {
		t.Fatalf("late withdraw removed the newer backend: %+v %v", rt, err)
	}
	used, _ := reg.PortsInUse(ctx, "ps1")
	if len(used) != 1 || used[lo(20002)] != target {
		t.Fatalf("ports in use: %v", used)
	}
	if err := reg.withdraw(ctx, "ps1", []Publication{{Target: target, Port: 20002}}, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Get(ctx, target); !errors.Is(err, ErrNotFound) {
		t.Fatalf("want ErrNotFound after withdraw, got %v", err)
	}
	if list, _ := reg.List(ctx); len(list) != 0 {
		t.Fatalf("list after withdraw: %+v", list)
	}
}

func TestDeadPSIsCollectedAndItsPortsQuarantined(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(5*time.Second)))
	_ = reg.RenewPS(ctx, lease("ps2", "127.0.0.2", clk.Now().Add(time.Hour)))
	mustPublish(t, reg, "ps1", Publication{Target: ap("127.77.0.1:1"), Port: 20001, AgentID: "a1"},
		Publication{Target: ap("127.77.0.1:2"), Port: 20002, AgentID: "a1"})

	if dead, err := reg.CollectDead(ctx, 10*time.Second, time.Minute); err != nil || len(dead) != 0 {
		t.Fatalf("collected a live PS: %v %v", dead, err)
	}
	// ps1's last renewal ran out 20s ago (on Redis's clock).
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(-20*time.Second)))
	dead, err := reg.CollectDead(ctx, 10*time.Second, time.Minute)
	if err != nil || len(dead) != 1 || dead[0] != "ps1" {
		t.Fatalf("want ps1 collected, got %v %v", dead, err)
	}
	if used, _ := reg.PortsInUse(ctx, "ps1"); len(used) != 0 {
		t.Fatalf("dead PS still holds ports: %v", used)
	}
	q, err := reg.Quarantined(ctx, "ps1")
	if err != nil || len(q) != 2 || nearErr(q[lo(20001)], clk.Now().Add(time.Minute)) != nil {
		t.Fatalf("ports of a dead PS must be quarantined for a minute: %v %v", q, err)
	}
	leases, _ := reg.PSLeases(ctx)
	if _, ok := leases["ps1"]; ok {
		t.Fatal("dead PS lease not forgotten")
	}
	// A quarantine ends on Redis's clock, and Quarantined drops it then.
	if err := reg.Release(ctx, "ps1", []Publication{{Target: ap("127.77.0.1:3"), Port: 20003}}, clk.Now().Add(200*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "the short quarantine ends", func() error {
		q, err := reg.Quarantined(ctx, "ps1")
		if _, ok := q[lo(20003)]; err != nil || ok || len(q) != 2 {
			return fmt.Errorf("quarantine %v %v: want only 20001 and 20002", q, err)
		}
		return nil
	})
}

func TestGarbageInRedisIsSkippedNotFatal(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Minute)))
	mustPublish(t, reg, "ps1", Publication{Target: ap("127.77.0.1:9100"), Port: 20001, AgentID: "a1"})
	// Someone writes junk into our keyspace.
	rdb := reg.rdb
	rdb.SAdd(ctx, reg.keys.targets(), "not-a-target", "127.77.0.2:1")
	rdb.HSet(ctx, reg.keys.routeRaw("127.77.0.2:1"), "ps1", "{garbage")
	rdb.HSet(ctx, reg.keys.ps("psX"), "addr", "nope", "expires_ms", "x", "state", "weird")
	rdb.SAdd(ctx, reg.keys.pses(), "psX")

	list, err := reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Target != ap("127.77.0.1:9100") {
		t.Fatalf("good route lost or junk returned: %+v", list)
	}
}

func TestChangeFeedResumesAndDetectsTrimming(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg, err := New(Config{URL: rd.URL(), StreamMaxLen: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Minute)))
	snap, err := reg.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustPublish(t, reg, "ps1", Publication{Target: ap("127.77.0.1:1"), Port: 20001, AgentID: "a1"})
	ch, err := reg.ReadChanges(ctx, snap.Cursor, 100, 0)
	if err != nil || len(ch) != 1 || ch[0].Kind != ChangeRoute || ch[0].ID != "127.77.0.1:1" {
		t.Fatalf("want one route change, got %+v %v", ch, err)
	}
	cursor := ch[0].Cursor
	if more, err := reg.ReadChanges(ctx, cursor, 100, 0); err != nil || len(more) != 0 {
		t.Fatalf("nothing new expected: %+v %v", more, err)
	}
	// Far more changes than the stream keeps: the reader must be told to resync.
	for i := range 300 {
		mustPublish(t, reg, "ps1", Publication{Target: ap(fmt.Sprintf("127.77.1.1:%d", i+1)), Port: uint16(21000 + i), AgentID: "a1"})
	}
	if _, err := reg.ReadChanges(ctx, cursor, 100, 0); !errors.Is(err, ErrCursorLost) {
		t.Fatalf("want ErrCursorLost after trimming, got %v", err)
	}
	// A cursor from the future (Redis lost its data) is lost too.
	if _, err := reg.ReadChanges(ctx, "99999999999999-0", 100, 0); !errors.Is(err, ErrCursorLost) {
		t.Fatalf("want ErrCursorLost for a cursor past the end, got %v", err)
	}
}

func TestRoutesSurviveARedisRestart(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Minute)))
	mustPublish(t, reg, "ps1", Publication{Target: ap("127.77.0.1:9100"), Port: 20001, AgentID: "a1"})
	rd.Stop()
	if _, err := reg.Get(ctx, ap("127.77.0.1:9100")); err == nil {
		t.Fatal("expected an error while Redis is down")
	}
	rd.Start()
	testutil.Eventually(t, 5*time.Second, "route back after restart", func() error {
		_, err := reg.Get(ctx, ap("127.77.0.1:9100"))
		return err
	})
}

func TestBadConfigIsRefused(t *testing.T) {
	for _, cfg := range []Config{{}, {URL: "http://x"}, {URL: "redis://x", Addrs: []string{"y"}}, {URL: "redis://x", Prefix: "a:b"}} {
		if _, err := New(cfg); err == nil {
			t.Errorf("config %+v accepted", cfg)
		}
	}
	reg, _ := New(Config{URL: "redis://127.0.0.1:1"})
	defer reg.Close()
	if err := reg.RenewPS(context.Background(), PSLease{ID: "bad id"}); err == nil {
		t.Error("a PS id with a blank was accepted")
	}
}

package registry

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

func TestReleaseQuarantinesThePortsAndWithdrawsTheRoutes(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(time.Minute)))
	a, b := ap("127.77.0.1:1"), ap("127.77.0.1:2")
	mustPublish(t, reg, "ps1", Publication{Target: a, Port: 20001, AgentID: "a1"}, Publication{Target: b, Port: 20002, AgentID: "a1"})
	snap, err := reg.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}

	until := clk.Now().Add(time.Minute).Truncate(time.Millisecond)
	if err := reg.Release(ctx, "ps1", []Publication{{Target: a, Port: 20001}, {Target: b, Port: 20002}}, until); err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{"127.77.0.1:1", "127.77.0.1:2"} {
		if _, err := reg.Get(ctx, ap(target)); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s is still routed after its release: %v", target, err)
		}
	}
	if used, _ := reg.PortsInUse(ctx, "ps1"); len(used) != 0 {
		t.Errorf("released ports are still in use: %v", used)
	}
	q, err := reg.Quarantined(ctx, "ps1")
	if err != nil {
		t.Fatal(err)
	}
	if len(q) != 2 || nearErr(q[lo(20001)], until) != nil || nearErr(q[lo(20002)], until) != nil {
		t.Errorf("want ports 20001 and 20002 quarantined until %v, got %v", until, q)
	}
	changes, err := reg.ReadChanges(ctx, snap.Cursor, 100, 0)
	if err != nil || len(changes) != 2 {
		t.Errorf("readers must hear of both withdrawals: %+v %v", changes, err)
	}
}

func TestALateReleaseKeepsTheNewerRouteButQuarantinesItsOwnPort(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(time.Minute)))
	target := ap("127.77.0.1:9100")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	// The agent reconnected and got a new port before the old one was released.
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20002, AgentID: "a1"})

	if err := reg.Release(ctx, "ps1", []Publication{{Target: target, Port: 20001}}, clk.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	rt, err := reg.Get(ctx, target)
	if err != nil || rt.Backends[0].Address.Port() != 20002 {
		t.Fatalf("a late release removed the newer backend: %+v %v", rt, err)
	}
	q, _ := reg.Quarantined(ctx, "ps1")
	if _, ok := q[lo(20001)]; !ok || len(q) != 1 {
		t.Fatalf("want only the released port 20001 quarantined, got %v", q)
	}
}

func TestReleaseNeverShortensAQuarantine(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(time.Minute)))
	later := clk.Now().Add(time.Hour).Truncate(time.Millisecond)
	target := ap("127.77.0.1:9100")
	// An earlier release of port 20001 (nothing to withdraw yet) quarantined
	// it for an hour.
	if err := reg.Release(ctx, "ps1", []Publication{{Target: target, Port: 20001}}, later); err != nil {
		t.Fatal(err)
	}
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	if err := reg.Release(ctx, "ps1", []Publication{{Target: target, Port: 20001}}, clk.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if q, _ := reg.Quarantined(ctx, "ps1"); nearErr(q[lo(20001)], later) != nil {
		t.Fatalf("the longer quarantine was shortened: got %v want %v", q[lo(20001)], later)
	}
}

// Redis does not roll back a script that fails halfway. Release must
// still never leave a withdrawn port without its quarantine.
func TestAReleaseThatFailsHalfwayLeavesNoWithdrawnPortUnquarantined(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", clk.Now().Add(time.Minute)))
	good, broken := ap("127.77.0.1:1"), ap("127.77.0.1:2")
	mustPublish(t, reg, "ps1", Publication{Target: good, Port: 20001, AgentID: "a1"})
	// A route key of the wrong type makes the script fail at the second pair,
	// after it has withdrawn the first.
	if err := reg.rdb.Set(ctx, reg.keys.route(broken), "junk", 0).Err(); err != nil {
		t.Fatal(err)
	}

	err := reg.Release(ctx, "ps1", []Publication{{Target: good, Port: 20001}, {Target: broken, Port: 20002}}, clk.Now().Add(time.Minute))
	if err == nil {
		t.Fatal("a release over a broken key reported success")
	}
	q, qerr := reg.Quarantined(ctx, "ps1")
	if qerr != nil {
		t.Fatal(qerr)
	}
	if _, ok := q[lo(20002)]; !ok {
		t.Errorf("the port of the failed pair is not quarantined: %v", q)
	}
	if _, err := reg.Get(ctx, good); errors.Is(err, ErrNotFound) {
		if _, ok := q[lo(20001)]; !ok {
			t.Fatalf("port 20001 was withdrawn but not quarantined: %v", q)
		}
	}
}

func TestReleaseRefusesABadPSID(t *testing.T) {
	reg, err := New(Config{URL: "redis://127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	for _, id := range []string{"", "bad id", "ps:1", "{ps}", "ps\x01"} {
		if err := reg.Release(context.Background(), id, []Publication{{Target: ap("127.77.0.1:1"), Port: 1}}, time.Now()); err == nil {
			t.Errorf("ps id %q was accepted", id)
		}
	}
}

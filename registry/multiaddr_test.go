package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/testutil"
)

// redisZ is a quarantine member as a writer stores it: score = unix ms
// (Redis runs on this host, so its clock is the test's).
func redisZ(until time.Time, member string) redis.Z {
	return redis.Z{Score: float64(until.UnixMilli()), Member: member}
}

var (
	addrA = netip.MustParseAddr("127.0.0.1")
	addrB = netip.MustParseAddr("127.0.0.2")
	addrC = netip.MustParseAddr("127.0.0.3")
)

// multiLease is a lease of id advertising addrs, the first the primary.
func multiLease(id string, until time.Time, addrs ...netip.Addr) PSLease {
	return PSLease{ID: id, Addr: addrs[0], Addrs: addrs, State: PSActive, ExpiresAt: until}
}

func TestLeaseAddrsMustContainTheirPrimaryAndReadBackPrimaryFirst(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	until := time.Now().Add(time.Minute)

	bad := PSLease{ID: "ps1", Addr: addrA, Addrs: []netip.Addr{addrB, addrC}, State: PSActive, ExpiresAt: until}
	if err := reg.RenewPS(ctx, bad); err == nil || !strings.Contains(err.Error(), "do not contain the primary address 127.0.0.1") {
		t.Fatalf("a lease whose Addrs lack Addr: %v, want a refusal naming the primary", err)
	}
	if err := reg.ClaimPS(ctx, PSLease{ID: "ps1", Addr: addrA, Addrs: []netip.Addr{addrA, addrB, addrB}, Nonce: "n1", TTL: time.Minute}); err == nil {
		t.Fatal("a lease listing an address twice was accepted")
	}
	if leases, _ := reg.PSLeases(ctx); len(leases) != 0 {
		t.Fatalf("a refused lease was written: %+v", leases)
	}

	// Addr first whatever order Addrs has; nil Addrs reads back as [Addr].
	if err := reg.RenewPS(ctx, PSLease{ID: "ps1", Addr: addrB, Addrs: []netip.Addr{addrA, addrB, addrC}, State: PSActive, ExpiresAt: until}); err != nil {
		t.Fatal(err)
	}
	if err := reg.RenewPS(ctx, lease("ps2", "127.0.0.4", until)); err != nil {
		t.Fatal(err)
	}
	leases, err := reg.PSLeases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(leases["ps1"].Addr, leases["ps1"].Addrs), "127.0.0.2 [127.0.0.2 127.0.0.1 127.0.0.3]"; got != want {
		t.Errorf("ps1 reads back as %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(leases["ps2"].Addrs), "[127.0.0.4]"; got != want {
		t.Errorf("a lease written without Addrs reads back with %s, want %s", got, want)
	}
	// A lease written by an older version (no addrs field) reads as [addr].
	if err := reg.rdb.HDel(ctx, reg.keys.ps("ps2"), "addrs").Err(); err != nil {
		t.Fatal(err)
	}
	if leases, err = reg.PSLeases(ctx); err != nil || fmt.Sprint(leases["ps2"].Addrs) != "[127.0.0.4]" {
		t.Errorf("an old-format lease reads back with Addrs %v (%v), want [127.0.0.4]", leases["ps2"].Addrs, err)
	}
}

// Routes on a PS's second address read back (Get, List, Mirror) with that
// address; when the lease stops advertising it, they are stale and left
// out, while the routes on the addresses it keeps stay.
func TestRoutesOnEveryAdvertisedAddressAndStaleWhenItIsDropped(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	until := time.Now().Add(time.Hour)
	if err := reg.RenewPS(ctx, multiLease("ps1", until, addrA, addrB)); err != nil {
		t.Fatal(err)
	}
	onA, onB, onPrimary := ap("198.18.1.1:80"), ap("198.18.1.2:80"), ap("198.18.1.3:80")
	// The same port on two addresses: two distinct backends.
	mustPublish(t, reg, "ps1",
		Publication{Target: onA, Addr: addrA, Port: 20001, AgentID: "a1"},
		Publication{Target: onB, Addr: addrB, Port: 20001, AgentID: "a1"},
		Publication{Target: onPrimary, Port: 20002, AgentID: "a1"}) // zero Addr: the primary
	want := map[netip.AddrPort]string{onA: "127.0.0.1:20001", onB: "127.0.0.2:20001", onPrimary: "127.0.0.1:20002"}
	for target, addr := range want {
		rt, err := reg.Get(ctx, target)
		if err != nil || len(rt.Backends) != 1 || rt.Backends[0].Address.String() != addr {
			t.Errorf("Get %s: %+v %v, want one backend at %s", target, rt, err, addr)
		}
	}
	used, err := reg.PortsInUse(ctx, "ps1")
	if err != nil || len(used) != 3 || used[netip.AddrPortFrom(addrB, 20001)] != onB || used[netip.AddrPortFrom(addrA, 20001)] != onA {
		t.Fatalf("PortsInUse: %v %v, want 127.0.0.1:20001, 127.0.0.2:20001, 127.0.0.1:20002", used, err)
	}
	// The psroutes field is the PS ip:port.
	if got, _ := reg.rdb.HGet(ctx, reg.keys.psroutes("ps1"), "127.0.0.2:20001").Result(); got != onB.String() {
		t.Errorf("psroutes field 127.0.0.2:20001 holds %q, want %s", got, onB)
	}

	sink := newRecordingSink()
	m := startMirror(t, reg, sink, time.Hour, nil)
	for target, addr := range want {
		if got := describe(sink.get(target)); got != "ps1="+addr+"/live " {
			t.Errorf("mirror sink for %s: %q, want ps1=%s/live", target, got, addr)
		}
		if bs, ok := m.Lookup(target); !ok || bs[0].Address.String() != addr {
			t.Errorf("mirror lookup %s: %+v, want %s", target, bs, addr)
		}
	}

	// The PS stops advertising 127.0.0.2: its route there is stale.
	if err := reg.RenewPS(ctx, multiLease("ps1", until, addrA, addrC)); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Get(ctx, onB); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of a route on an address the lease dropped: %v, want ErrNotFound", err)
	}
	list, err := reg.List(ctx)
	if err != nil || len(list) != 2 {
		t.Errorf("List after the address was dropped: %+v %v, want the two routes on 127.0.0.1", list, err)
	}
	testutil.Eventually(t, 5*time.Second, "the mirror drops the stale route", func() error {
		if bs, ok := m.Lookup(onB); ok {
			return fmt.Errorf("lookup still gives %+v", bs)
		}
		if got := describe(sink.get(onB)); got != "" {
			return fmt.Errorf("sink still has %q", got)
		}
		return nil
	})
	if got := describe(sink.get(onA)); got != "ps1=127.0.0.1:20001/live " {
		t.Errorf("the route on the kept address changed in the sink: %q", got)
	}
}

// A publication that moves a target to the same port on another address
// replaces the old (address, port) in the port index.
func TestRepublishOnAnotherAddressReindexes(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	if err := reg.RenewPS(ctx, multiLease("ps1", time.Now().Add(time.Hour), addrA, addrB)); err != nil {
		t.Fatal(err)
	}
	target := ap("198.18.1.1:80")
	mustPublish(t, reg, "ps1", Publication{Target: target, Addr: addrA, Port: 20001, AgentID: "a1"})
	mustPublish(t, reg, "ps1", Publication{Target: target, Addr: addrB, Port: 20001, AgentID: "a1"})
	used, err := reg.PortsInUse(ctx, "ps1")
	if err != nil || len(used) != 1 || used[netip.AddrPortFrom(addrB, 20001)] != target {
		t.Fatalf("PortsInUse after the move: %v %v, want only 127.0.0.2:20001", used, err)
	}
}

// Release removes a backend only when both its address and its port match
// (an entry without an address matches on the port), and quarantines the
// (address, port) pair it was given either way.
func TestReleaseMatchesOnAddressAndPort(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	if err := reg.RenewPS(ctx, multiLease("ps1", time.Now().Add(time.Hour), addrA, addrB)); err != nil {
		t.Fatal(err)
	}
	target, old := ap("198.18.1.1:80"), ap("198.18.1.2:80")
	mustPublish(t, reg, "ps1", Publication{Target: target, Addr: addrB, Port: 20001, AgentID: "a1"})
	until := time.Now().Add(time.Minute)

	if err := reg.Release(ctx, "ps1", []Publication{{Target: target, Addr: addrA, Port: 20001}}, until); err != nil {
		t.Fatal(err)
	}
	if rt, err := reg.Get(ctx, target); err != nil || rt.Backends[0].Address != netip.AddrPortFrom(addrB, 20001) {
		t.Fatalf("a release of 127.0.0.1:20001 touched the backend at 127.0.0.2:20001: %+v %v", rt, err)
	}
	if used, _ := reg.PortsInUse(ctx, "ps1"); used[netip.AddrPortFrom(addrB, 20001)] != target {
		t.Fatalf("a release of another address unindexed the backend: %v", used)
	}
	q, _ := reg.Quarantined(ctx, "ps1")
	if _, ok := q[netip.AddrPortFrom(addrA, 20001)]; !ok || len(q) != 1 {
		t.Fatalf("quarantine after releasing 127.0.0.1:20001: %v, want that pair only", q)
	}

	if err := reg.Release(ctx, "ps1", []Publication{{Target: target, Addr: addrB, Port: 20001}}, until); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Get(ctx, target); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a release of the backend's own address and port left it: %v", err)
	}
	if used, _ := reg.PortsInUse(ctx, "ps1"); len(used) != 0 {
		t.Fatalf("ports in use after the release: %v", used)
	}

	// An entry of an older version, without an address, matches on the port.
	if err := reg.rdb.HSet(ctx, reg.keys.route(old), "ps1", `{"port":20002,"agent_id":"a1"}`).Err(); err != nil {
		t.Fatal(err)
	}
	if err := reg.Release(ctx, "ps1", []Publication{{Target: old, Addr: addrB, Port: 20002}}, until); err != nil {
		t.Fatal(err)
	}
	if n, _ := reg.rdb.HLen(ctx, reg.keys.route(old)).Result(); n != 0 {
		t.Fatalf("the release left an entry without an address on the same port")
	}
}

// Records written by the previous version name a bare port: they are read
// on an address (the entry's, else the lease's primary), withdrawn by
// WithdrawAll, and a bare quarantine is honoured on every address.
func TestOldFormatPortRecordsAreReadWithdrawnAndHonoured(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	if err := reg.RenewPS(ctx, multiLease("ps1", time.Now().Add(time.Hour), addrA, addrB)); err != nil {
		t.Fatal(err)
	}
	plain, withAddr, fresh := ap("198.18.1.1:80"), ap("198.18.1.2:80"), ap("198.18.1.3:80")
	// What the previous version wrote: route entries, bare psroutes fields
	// and a bare quarantine member.
	for _, c := range []struct {
		target netip.AddrPort
		port   string
		raw    string
	}{
		{plain, "20005", `{"port":20005,"agent_id":"a1"}`},
		{withAddr, "20007", `{"port":20007,"agent_id":"a1","addr":"127.0.0.2"}`},
	} {
		if err := reg.rdb.HSet(ctx, reg.keys.route(c.target), "ps1", c.raw).Err(); err != nil {
			t.Fatal(err)
		}
		if err := reg.rdb.SAdd(ctx, reg.keys.targets(), c.target.String()).Err(); err != nil {
			t.Fatal(err)
		}
		if err := reg.rdb.HSet(ctx, reg.keys.psroutes("ps1"), c.port, c.target.String()).Err(); err != nil {
			t.Fatal(err)
		}
	}
	qUntil := time.Now().Add(time.Hour)
	if err := reg.rdb.ZAdd(ctx, reg.keys.quarantine("ps1"), redisZ(qUntil, "20006")).Err(); err != nil {
		t.Fatal(err)
	}
	mustPublish(t, reg, "ps1", Publication{Target: fresh, Addr: addrB, Port: 20008, AgentID: "a1"})

	used, err := reg.PortsInUse(ctx, "ps1")
	if err != nil {
		t.Fatal(err)
	}
	wantUsed := map[netip.AddrPort]netip.AddrPort{
		netip.AddrPortFrom(addrA, 20005): plain,    // no address anywhere: the primary
		netip.AddrPortFrom(addrB, 20007): withAddr, // the entry's own address
		netip.AddrPortFrom(addrB, 20008): fresh,
	}
	if fmt.Sprint(used) != fmt.Sprint(wantUsed) {
		t.Fatalf("PortsInUse over old records: %v, want %v", used, wantUsed)
	}
	q, err := reg.Quarantined(ctx, "ps1")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{addrA, addrB} {
		if err := nearErr(q[netip.AddrPortFrom(a, 20006)], qUntil); err != nil {
			t.Errorf("a bare quarantine of port 20006 on %s: %v", a, err)
		}
	}

	ports, err := reg.WithdrawAll(ctx, "ps1", time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.AddrPort{netip.AddrPortFrom(addrA, 20005), netip.AddrPortFrom(addrB, 20007), netip.AddrPortFrom(addrB, 20008)}
	if !slices.Equal(ports, want) {
		t.Fatalf("WithdrawAll: %v, want %v (sorted)", ports, want)
	}
	if list, _ := reg.List(ctx); len(list) != 0 {
		t.Fatalf("routes left after WithdrawAll: %+v", list)
	}
	if n, _ := reg.rdb.HLen(ctx, reg.keys.psroutes("ps1")).Result(); n != 0 {
		fields, _ := reg.rdb.HGetAll(ctx, reg.keys.psroutes("ps1")).Result()
		t.Fatalf("port records left after WithdrawAll: %v", fields)
	}
	members, _ := reg.rdb.ZRange(ctx, reg.keys.quarantine("ps1"), 0, -1).Result()
	slices.Sort(members)
	if got := strings.Join(members, " "); got != "127.0.0.1:20005 127.0.0.2:20007 127.0.0.2:20008 20006" {
		t.Fatalf("quarantine members after WithdrawAll: %q", got)
	}
}

// A republication of a target first published by the previous version
// replaces its bare port record with the ip:port one.
func TestRepublishReplacesAnOldFormatRecord(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Hour)))
	target := ap("198.18.1.1:80")
	_ = reg.rdb.HSet(ctx, reg.keys.route(target), "ps1", `{"port":20005,"agent_id":"a1","addr":"127.0.0.1"}`).Err()
	_ = reg.rdb.HSet(ctx, reg.keys.psroutes("ps1"), "20005", target.String()).Err()
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20005, AgentID: "a1"})
	fields, err := reg.rdb.HGetAll(ctx, reg.keys.psroutes("ps1")).Result()
	if err != nil || len(fields) != 1 || fields["127.0.0.1:20005"] != target.String() {
		t.Fatalf("port records after the republication: %v %v, want only 127.0.0.1:20005", fields, err)
	}
}

// IPv6 PS addresses are written as [v6]:port, as netip.AddrPort prints them.
func TestIPv6PortRecordsUseBrackets(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	v6 := netip.MustParseAddr("fd00::1")
	if err := reg.RenewPS(ctx, multiLease("ps1", time.Now().Add(time.Hour), addrA, v6)); err != nil {
		t.Fatal(err)
	}
	target := ap("198.18.1.1:80")
	mustPublish(t, reg, "ps1", Publication{Target: target, Addr: v6, Port: 20001, AgentID: "a1"})
	if got, _ := reg.rdb.HGet(ctx, reg.keys.psroutes("ps1"), "[fd00::1]:20001").Result(); got != target.String() {
		t.Fatalf("psroutes field [fd00::1]:20001 holds %q", got)
	}
	if err := reg.Release(ctx, "ps1", []Publication{{Target: target, Addr: v6, Port: 20001}}, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	q, _ := reg.Quarantined(ctx, "ps1")
	if _, ok := q[netip.AddrPortFrom(v6, 20001)]; !ok {
		t.Fatalf("quarantine: %v, want [fd00::1]:20001", q)
	}
}

// A target named twice in one Publish is judged the second time after the
// first publication is written, as if it came in a later call: the later
// port replaces the earlier one, and another agent's claim is refused.
func TestATargetNamedTwiceInOnePublishIsJudgedInOrder(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	_ = reg.RenewPS(ctx, lease("ps1", "127.0.0.1", time.Now().Add(time.Hour)))
	target, other := ap("198.18.1.1:80"), ap("198.18.1.2:80")
	errs, err := reg.Publish(ctx, "ps1", []Publication{
		{Target: target, Port: 20001, AgentID: "a1"},
		{Target: other, Port: 20003, AgentID: "a1"},
		{Target: target, Port: 20002, AgentID: "a1"},
		{Target: target, Port: 20004, AgentID: "intruder"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if errs[0] != nil || errs[1] != nil || errs[2] != nil || !errors.Is(errs[3], ErrConflict) {
		t.Fatalf("results %v, want nil nil nil ErrConflict", errs)
	}
	used, err := reg.PortsInUse(ctx, "ps1")
	if err != nil || len(used) != 2 || used[lo(20002)] != target || used[lo(20003)] != other {
		t.Fatalf("PortsInUse: %v %v, want 127.0.0.1:20002 and 127.0.0.1:20003 only", used, err)
	}
	if rt, err := reg.Get(ctx, target); err != nil || rt.Backends[0].Address != lo(20002) || rt.Backends[0].AgentID != "a1" {
		t.Fatalf("Get: %+v %v, want a1 at 127.0.0.1:20002", rt, err)
	}
}

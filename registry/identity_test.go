package registry

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

func claimLease(id, addr, nonce string, ttl time.Duration) PSLease {
	return PSLease{ID: id, Addr: netip.MustParseAddr(addr), State: PSActive, TTL: ttl, Nonce: nonce}
}

// A second instance of a PS id is refused while the first one's lease is
// live, with an error naming the holder's address, and writes nothing.
func TestClaimIsRefusedWhileAnotherInstanceIsLive(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	first := newTestRegistry(t, rd.URL(), nil)
	second := newTestRegistry(t, rd.URL(), nil)
	if err := first.ClaimPS(ctx, claimLease("ps1", "127.0.0.1", "n1", time.Minute)); err != nil {
		t.Fatal(err)
	}
	err := second.ClaimPS(ctx, claimLease("ps1", "127.0.0.2", "n2", time.Minute))
	var held *LeaseHeldError
	if !errors.As(err, &held) || !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("second claim: got %v, want a LeaseHeldError", err)
	}
	if held.Addr != "127.0.0.1" || held.Nonce != "n1" || held.ExpiresIn < 50*time.Second || held.ExpiresIn > time.Minute {
		t.Errorf("held: %+v, want the first instance's address, nonce and about a minute left", held)
	}
	if want := "ps id ps1 is held by a live instance at 127.0.0.1 (lease expires in "; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q, want it to start with %q", err, want)
	}
	l := leaseOf(t, first, "ps1")
	if l.Nonce != "n1" || l.Addr.String() != "127.0.0.1" {
		t.Errorf("the refused claim changed the lease: %+v", l)
	}
	// The holder keeps renewing, and claiming again under its own nonce
	// (a retried start) is not refused.
	if err := first.RenewPS(ctx, claimLease("ps1", "127.0.0.1", "", time.Minute)); err != nil {
		t.Errorf("the holder's renewal: %v", err)
	}
	if err := first.ClaimPS(ctx, claimLease("ps1", "127.0.0.1", "n1", time.Minute)); err != nil {
		t.Errorf("a claim under the holder's own nonce: %v", err)
	}
	// A lease written without a nonce (an older version) is held too.
	if err := first.RenewPS(ctx, claimLease("old", "127.0.0.3", "", time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := second.ClaimPS(ctx, claimLease("old", "127.0.0.2", "n2", time.Minute)); !errors.Is(err, ErrLeaseHeld) {
		t.Errorf("claim of an id with a live lease without nonce: %v, want ErrLeaseHeld", err)
	}
}

// A lapsed lease (a crashed predecessor) is taken over; from then on every
// write of the old instance is refused with ErrLeaseTaken and changes
// nothing of the new holder's state.
func TestClaimTakesOverALapsedLeaseAndFencesTheOldInstance(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	old := newTestRegistry(t, rd.URL(), nil)
	cur := newTestRegistry(t, rd.URL(), nil)
	if err := old.ClaimPS(ctx, claimLease("ps1", "127.0.0.1", "old", 300*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	target := ap("127.77.0.1:80")
	mustPublish(t, old, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})

	testutil.Eventually(t, 10*time.Second, "the lapsed lease is taken over", func() error {
		return cur.ClaimPS(ctx, claimLease("ps1", "127.0.0.2", "new", time.Minute))
	})
	if ports, err := cur.WithdrawAll(ctx, "ps1", time.Now().Add(time.Minute)); err != nil || len(ports) != 1 {
		t.Fatalf("the new holder's cleanup of the leftovers: %v, %v", ports, err)
	}
	mustPublish(t, cur, "ps1", Publication{Target: target, Port: 20001, AgentID: "a2"})

	if err := old.RenewPS(ctx, claimLease("ps1", "127.0.0.1", "", time.Minute)); !errors.Is(err, ErrLeaseTaken) {
		t.Errorf("old instance's renewal: %v, want ErrLeaseTaken", err)
	}
	if _, err := old.Publish(ctx, "ps1", []Publication{{Target: target, Port: 20001, AgentID: "a1"}}); !errors.Is(err, ErrLeaseTaken) {
		t.Errorf("old instance's publish: %v, want ErrLeaseTaken", err)
	}
	if err := old.Release(ctx, "ps1", []Publication{{Target: target, Port: 20001}}, time.Now().Add(time.Minute)); !errors.Is(err, ErrLeaseTaken) {
		t.Errorf("old instance's release: %v, want ErrLeaseTaken", err)
	}
	if err := old.Forget(ctx, "ps1"); !errors.Is(err, ErrLeaseTaken) {
		t.Errorf("old instance's forget: %v, want ErrLeaseTaken", err)
	}

	l := leaseOf(t, cur, "ps1")
	if l.Nonce != "new" || l.Addr.String() != "127.0.0.2" || !l.Live(time.Now()) {
		t.Errorf("lease after the old instance's writes: %+v, want the new holder's, live", l)
	}
	rt, err := cur.Get(ctx, target)
	if err != nil || len(rt.Backends) != 1 || rt.Backends[0].AgentID != "a2" || rt.Backends[0].Address != ap("127.0.0.2:20001") {
		t.Errorf("route after the old instance's writes: %+v, %v; want the new holder's a2 at 127.0.0.2:20001", rt, err)
	}
}

// A renewal whose nonce is no longer the lease's (here rewritten directly,
// as another instance's claim would) writes nothing.
func TestGuardedRenewalOfATakenLeaseWritesNothing(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	if err := reg.ClaimPS(ctx, claimLease("ps1", "127.0.0.1", "mine", time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := reg.rdb.HSet(ctx, reg.keys.ps("ps1"), "nonce", "theirs", "addr", "127.0.0.9").Err(); err != nil {
		t.Fatal(err)
	}
	err := reg.RenewPS(ctx, PSLease{ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: PSDraining, TTL: time.Hour})
	if !errors.Is(err, ErrLeaseTaken) || !strings.Contains(err.Error(), "127.0.0.9") {
		t.Fatalf("renewal: %v, want ErrLeaseTaken naming 127.0.0.9", err)
	}
	l := leaseOf(t, reg, "ps1")
	if l.Nonce != "theirs" || l.Addr.String() != "127.0.0.9" || l.State != PSActive || time.Until(l.ExpiresAt) > time.Minute {
		t.Errorf("the refused renewal changed the lease: %+v", l)
	}
}

// Route entries record the address of the lease they were published
// under; an entry whose address is no longer its PS's is not a backend.
func TestRouteEntriesCarryThePSAddress(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	if err := reg.ClaimPS(ctx, claimLease("ps1", "127.0.0.1", "n1", time.Minute)); err != nil {
		t.Fatal(err)
	}
	target := ap("127.77.0.1:80")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	raw, err := reg.rdb.HGet(ctx, reg.keys.route(target), "ps1").Result()
	if err != nil {
		t.Fatal(err)
	}
	var e entry
	if err := json.Unmarshal([]byte(raw), &e); err != nil || e.Addr != "127.0.0.1" {
		t.Fatalf("entry %s (%v): want addr 127.0.0.1", raw, err)
	}
	if rt, err := reg.Get(ctx, target); err != nil || rt.Backends[0].Address != ap("127.0.0.1:20001") {
		t.Fatalf("get: %+v, %v", rt, err)
	}
	// The id now advertises another address (as a new instance would,
	// before it withdraws the old entries): the old entry leads nowhere.
	if err := reg.RenewPS(ctx, claimLease("ps1", "127.0.0.2", "", time.Minute)); err != nil {
		t.Fatal(err)
	}
	if rt, err := reg.Get(ctx, target); !errors.Is(err, ErrNotFound) {
		t.Errorf("an entry published at 127.0.0.1 is served at the lease's new address: %+v, %v", rt, err)
	}
}

func leaseOf(t *testing.T, reg *Registry, id string) PSLease {
	t.Helper()
	ls, err := reg.PSLeases(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ls[id]
}

package redirector

import (
	"net/netip"
	"testing"
	"time"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/registry"
)

// The entries the check expects are the reconciler's: lease-less backends
// left out, lapsed and lost ones dead, targets outside --target-cidrs and
// routes without a backend absent; and the diff names exactly what differs.
func TestRouteCheckExpectsWhatTheReconcilerWritesAndNamesEachDifference(t *testing.T) {
	now := time.Now()
	live, gone := now.Add(time.Minute), now.Add(-time.Second)
	ta := netip.MustParseAddrPort("198.18.1.11:9100")
	tb := netip.MustParseAddrPort("198.18.1.12:9100")
	out := netip.MustParseAddrPort("10.0.0.1:80")
	snap := registry.Snapshot{Routes: []registry.Route{
		{Target: ta, Backends: []registry.Backend{
			{PSID: "ps2", Address: netip.MustParseAddrPort("198.18.0.22:20001"), ExpiresAt: gone},
			{PSID: "ps1", Address: netip.MustParseAddrPort("198.18.0.21:20001"), ExpiresAt: live},
			{PSID: "ps3", Address: netip.AddrPortFrom(netip.Addr{}, 20001), ExpiresAt: live}, // no lease
		}},
		{Target: tb, Backends: []registry.Backend{{PSID: "ps1", Address: netip.MustParseAddrPort("198.18.0.21:20002"), ExpiresAt: live, Lost: true}}},
		{Target: out, Backends: []registry.Backend{{PSID: "ps1", Address: netip.MustParseAddrPort("198.18.0.21:20003"), ExpiresAt: live}}},
	}}
	targets, err := cidr.Parse([]string{"198.18.0.0/15"})
	if err != nil {
		t.Fatal(err)
	}
	want := desiredEntries(snap, now, targets)
	ka, _ := EncodeKey(ta)
	kb, _ := EncodeKey(tb)
	if len(want) != 2 {
		t.Fatalf("want entries for %s and %s only, got %d", ta, tb, len(want))
	}
	if got := slotsOf(want[ka]); len(got) != 2 || got[0] != (BackendSlot{netip.MustParseAddrPort("198.18.0.21:20001"), "live"}) || got[1].State != "dead" {
		t.Fatalf("slots of %s: %+v (ps1 first and live, ps2 dead, the lease-less one left out)", ta, got)
	}
	if got := slotsOf(want[kb]); len(got) != 1 || got[0].State != "dead" {
		t.Fatalf("a lost backend is dead: %+v", got)
	}

	if d := diffEntries(want, want); len(d) != 0 {
		t.Fatalf("identical maps differ: %+v", d)
	}
	have := map[bpf.RedirectRouteKey]bpf.RedirectRouteValue{ka: want[ka]}
	v := have[ka]
	v.Backends[0], v.Backends[1] = v.Backends[1], v.Backends[0] // another order: no difference
	v.Backends[1].State = stateDraining
	have[ka] = v
	kx, _ := EncodeKey(out)
	have[kx] = want[kb]
	diffs := diffEntries(want, have)
	if len(diffs) != 3 || diffs[0].Target != out || diffs[0].Kind != DiffExtra ||
		diffs[1].Target != ta || diffs[1].Kind != DiffBackends || len(diffs[1].Details) != 1 ||
		diffs[1].Details[0] != "198.18.0.21:20001 is draining in the kernel map, live in the registry" ||
		diffs[2].Target != tb || diffs[2].Kind != DiffMissing {
		t.Fatalf("differences: %+v", diffs)
	}
}

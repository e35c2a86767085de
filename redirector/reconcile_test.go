package redirector

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/registry"
)

// testTargets names the loopback range these tests' targets live in: a
// loopback target is installed only when named.
var testTargets = WithTargets(cidr.List{netip.MustParsePrefix("127.77.0.0/16")})

// fakeMap is a RouteMap in memory that records what it was asked to do.
type fakeMap struct {
	m       map[bpf.RedirectRouteKey]bpf.RedirectRouteValue
	puts    int
	deletes int
}

func newFakeMap() *fakeMap { return &fakeMap{m: map[bpf.RedirectRouteKey]bpf.RedirectRouteValue{}} }

func (f *fakeMap) Put(k []bpf.RedirectRouteKey, v []bpf.RedirectRouteValue) error {
	for i := range k {
		f.m[k[i]] = v[i]
		f.puts++
	}
	return nil
}

func (f *fakeMap) Delete(k []bpf.RedirectRouteKey) error {
	for _, x := range k {
		delete(f.m, x)
		f.deletes++
	}
	return nil
}

func (f *fakeMap) Keys() ([]bpf.RedirectRouteKey, error) {
	out := make([]bpf.RedirectRouteKey, 0, len(f.m))
	for k := range f.m {
		out = append(out, k)
	}
	return out, nil
}

type fakeDestroyer struct{ calls [][]netip.AddrPort }

func (d *fakeDestroyer) Destroy(_ context.Context, b []netip.AddrPort) (int, error) {
	d.calls = append(d.calls, b)
	return len(b), nil
}

func route(target string, backends ...registry.BackendState) registry.RouteState {
	return registry.RouteState{Target: netip.MustParseAddrPort(target), Backends: backends}
}

func backend(ps, addr string, live bool) registry.BackendState {
	return registry.BackendState{PSID: ps, Address: netip.MustParseAddrPort(addr), Live: live}
}

func TestKeyEncodingIsNetworkOrderAndRoundTrips(t *testing.T) {
	k, ok := EncodeKey(netip.MustParseAddrPort("127.77.0.1:9100"))
	if !ok {
		t.Fatal("IPv4 target refused")
	}
	if got := DecodeKey(k); got.String() != "127.77.0.1:9100" {
		t.Fatalf("round trip: %s", got)
	}
	// 9100 = 0x238c: the first byte in memory is 0x23, as in sin_port.
	b := (*[2]byte)(unsafe.Pointer(&k.Port))
	if b[0] != 0x23 || b[1] != 0x8c {
		t.Fatalf("port bytes in memory %x, want 238c", b[:])
	}
	if _, ok := EncodeKey(netip.MustParseAddrPort("[2001:db8::1]:80")); ok {
		t.Fatal("an IPv6 target cannot be a key")
	}
	if got, ok := EncodeKey(netip.MustParseAddrPort("[::ffff:10.1.2.3]:80")); !ok || DecodeKey(got).String() != "10.1.2.3:80" {
		t.Fatalf("IPv4-mapped target: %v %v", DecodeKey(got), ok)
	}
}

func TestReplaceLeavesExactlyTheDesiredRoutes(t *testing.T) {
	fm := newFakeMap()
	rec := NewReconciler(fm, nil, nil, testTargets)
	stale, _ := EncodeKey(netip.MustParseAddrPort("127.0.0.9:1"))
	fm.m[stale] = bpf.RedirectRouteValue{}
	err := rec.Replace(context.Background(), []registry.RouteState{
		route("127.77.0.1:9100", backend("ps1", "127.0.0.1:20001", true), backend("ps2", "127.0.0.2:30001", false)),
		route("127.77.0.2:9100"), // no backends: must not be in the map
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(fm.m) != 1 {
		t.Fatalf("map holds %d routes, want 1", len(fm.m))
	}
	k, _ := EncodeKey(netip.MustParseAddrPort("127.77.0.1:9100"))
	v := fm.m[k]
	a0, s0 := DecodeBackend(v.Backends[0])
	a1, s1 := DecodeBackend(v.Backends[1])
	_, s2 := DecodeBackend(v.Backends[2])
	if a0.String() != "127.0.0.1:20001" || s0 != "live" || a1.String() != "127.0.0.2:30001" || s1 != "dead" || s2 != "unused" {
		t.Fatalf("value: %s/%s %s/%s %s", a0, s0, a1, s1, s2)
	}
}

func TestABackendThatDiesHasItsSocketsDestroyedButADrainingOneDoesNot(t *testing.T) {
	fm := newFakeMap()
	d := &fakeDestroyer{}
	rec := NewReconciler(fm, d, nil, testTargets)
	ctx := context.Background()
	_ = rec.Replace(ctx, []registry.RouteState{
		route("127.77.0.1:1", backend("ps1", "127.0.0.1:20001", true), backend("ps2", "127.0.0.2:30001", true)),
	})
	draining := backend("ps2", "127.0.0.2:30001", false)
	draining.Draining = true
	_ = rec.Update(ctx, []registry.RouteState{
		route("127.77.0.1:1", backend("ps1", "127.0.0.1:20001", false), draining),
	})
	if !reflect.DeepEqual(d.calls, [][]netip.AddrPort{{netip.MustParseAddrPort("127.0.0.1:20001")}}) {
		t.Fatalf("destroy calls: %v", d.calls)
	}
	// Dead again: nothing more to destroy.
	_ = rec.Update(ctx, []registry.RouteState{route("127.77.0.1:1", backend("ps1", "127.0.0.1:20001", false))})
	if len(d.calls) != 1 {
		t.Fatalf("a backend already dead was destroyed again: %v", d.calls)
	}
}

// Whatever order updates arrive in, ending with a Replace of the final
// state leaves the map equal to that state (anti-entropy repairs anything).
func TestAnyUpdateOrderFollowedByReplaceConverges(t *testing.T) {
	var all []registry.RouteState
	for i := range 50 {
		tgt := fmt.Sprintf("127.77.%d.%d:%d", i/10, i%10+1, 9000+i)
		all = append(all, route(tgt, backend("ps1", fmt.Sprintf("127.0.0.1:%d", 20000+i), i%3 != 0)))
		all = append(all, route(tgt)) // withdrawn
		all = append(all, route(tgt, backend("ps2", fmt.Sprintf("127.0.0.2:%d", 30000+i), true)))
	}
	final := map[netip.AddrPort]registry.RouteState{}
	for _, r := range all {
		final[r.Target] = r
	}
	var finalList []registry.RouteState
	for _, r := range final {
		finalList = append(finalList, r)
	}
	want := newFakeMap()
	_ = NewReconciler(want, nil, nil, testTargets).Replace(context.Background(), finalList)

	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 1))
		fm := newFakeMap()
		rec := NewReconciler(fm, &fakeDestroyer{}, nil, testTargets)
		shuffled := append([]registry.RouteState(nil), all...)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		for i := 0; i < len(shuffled); i += 7 {
			_ = rec.Update(context.Background(), shuffled[i:min(i+7, len(shuffled))])
		}
		_ = rec.Replace(context.Background(), finalList)
		if !reflect.DeepEqual(fm.m, want.m) {
			t.Fatalf("seed %d: map differs from the desired state", seed)
		}
	}
}

// keysOf lists the targets in a fake map, sorted.
func keysOf(f *fakeMap) []string {
	var out []string
	for k := range f.m {
		out = append(out, DecodeKey(k).String())
	}
	slices.Sort(out)
	return out
}

func TestSpecialTargetsStayOutOfTheMapUnlessNamed(t *testing.T) {
	live := backend("ps1", "198.18.0.21:20001", true)
	routes := []registry.RouteState{
		route("198.18.1.11:9100", live),      // an ordinary agent
		route("127.0.0.1:6379", live),        // the host's own Redis
		route("127.77.0.1:9100", live),       // loopback, named by the second policy
		route("169.254.169.254:80", live),    // cloud metadata
		route("0.0.0.0:22", live),            // unspecified: reaches this host
		route("224.0.0.1:80", live),          // multicast
		route("[::ffff:127.0.0.1]:80", live), // mapped loopback is loopback
	}
	for _, tc := range []struct {
		name    string
		targets []string
		want    []string
		skipped uint64
	}{
		{"default", nil, []string{"198.18.1.11:9100"}, 6},
		{"0.0.0.0/0 names no special range", []string{"0.0.0.0/0"}, []string{"198.18.1.11:9100"}, 6},
		{"a range inside loopback names it", []string{"0.0.0.0/0", "127.77.0.0/16"}, []string{"127.77.0.1:9100", "198.18.1.11:9100"}, 5},
		{"a list given is the whole allow list", []string{"127.77.0.0/16"}, []string{"127.77.0.1:9100"}, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := cidr.Parse(tc.targets)
			if err != nil {
				t.Fatal(err)
			}
			fm := newFakeMap()
			var logs bytes.Buffer
			rec := NewReconciler(fm, nil, slog.New(slog.NewTextHandler(&logs, nil)), WithTargets(l))
			// Three full loads, as anti-entropy does, and the same routes
			// again as updates: each target is counted and logged once.
			for range 3 {
				if err := rec.Replace(context.Background(), routes); err != nil {
					t.Fatal(err)
				}
				if err := rec.Update(context.Background(), routes); err != nil {
					t.Fatal(err)
				}
			}
			if got := keysOf(fm); !slices.Equal(got, tc.want) {
				t.Fatalf("map holds %v, want %v", got, tc.want)
			}
			if got := rec.Skipped()[SkipTargetNotAllowed]; got != tc.skipped {
				t.Fatalf("skipped %d targets, want %d", got, tc.skipped)
			}
			if n := strings.Count(logs.String(), "level=WARN"); n != int(tc.skipped) {
				t.Fatalf("%d warnings for %d skipped targets, want one each:\n%s", n, tc.skipped, logs.String())
			}
			if !strings.Contains(logs.String(), "target=127.0.0.1:6379") {
				t.Fatalf("the warning must name the target:\n%s", logs.String())
			}
		})
	}
}

// A route let in under an older, wider policy leaves the map at the next
// full load (the first one after a restart with the narrower policy).
func TestAFullLoadRemovesRoutesThePolicyNoLongerAllows(t *testing.T) {
	fm := newFakeMap()
	routes := []registry.RouteState{route("127.77.0.1:9100", backend("ps1", "127.0.0.1:20001", true))}
	_ = NewReconciler(fm, nil, nil, testTargets).Replace(context.Background(), routes)
	if len(fm.m) != 1 {
		t.Fatalf("map holds %v", keysOf(fm))
	}
	rec := NewReconciler(fm, nil, nil) // default: loopback not named
	if err := rec.Replace(context.Background(), routes); err != nil {
		t.Fatal(err)
	}
	if len(fm.m) != 0 {
		t.Fatalf("a route the policy does not allow stayed in the map: %v", keysOf(fm))
	}
	// A withdrawal of a skipped route is not one more skip.
	_ = rec.Update(context.Background(), []registry.RouteState{route("127.0.0.9:1")})
	if got := rec.Skipped(); got[SkipTargetNotAllowed] != 1 || got[SkipNotIPv4] != 0 {
		t.Fatalf("skipped: %v", got)
	}
}

func TestRememberedSkipsAreBounded(t *testing.T) {
	var logs bytes.Buffer
	rec := NewReconciler(newFakeMap(), nil, slog.New(slog.NewTextHandler(&logs, nil)))
	live := backend("ps1", "198.18.0.21:20001", true)
	batch := make([]registry.RouteState, 0, 1000)
	for i := range maxRemembered + 1000 {
		batch = append(batch, route(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 1, byte(i >> 8), byte(i)}), uint16(1+i>>16)).String(), live))
		if len(batch) == cap(batch) {
			_ = rec.Update(context.Background(), batch)
			batch = batch[:0]
		}
	}
	if n := len(rec.remembered); n != maxRemembered {
		t.Fatalf("remembers %d targets, want at most %d", n, maxRemembered)
	}
	if got := rec.Skipped()[SkipTargetNotAllowed]; got != maxRemembered+1000 {
		t.Fatalf("skipped %d, want %d", got, maxRemembered+1000)
	}
	if n := strings.Count(logs.String(), "more targets than are logged"); n != 1 {
		t.Fatalf("the overflow must be said once, said %d times", n)
	}
}

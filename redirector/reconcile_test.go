package redirector

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"testing"
	"unsafe"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/registry"
)

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
	rec := NewReconciler(fm, nil, nil)
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
	rec := NewReconciler(fm, d, nil)
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
	_ = NewReconciler(want, nil, nil).Replace(context.Background(), finalList)

	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 1))
		fm := newFakeMap()
		rec := NewReconciler(fm, &fakeDestroyer{}, nil)
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

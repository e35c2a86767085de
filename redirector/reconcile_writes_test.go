package redirector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/registry"
)

// boundedMap is a RouteMap in memory with a capacity, as the kernel's:
// a new key past it is refused with ErrMapFull (an existing key can still
// be changed), and chosen keys fail to write. It records the order of its
// operations, and keeps going past failed keys as the kernel map does.
type boundedMap struct {
	m    map[bpf.RedirectRouteKey]bpf.RedirectRouteValue
	cap  int
	fail map[bpf.RedirectRouteKey]error
	ops  []string
}

func newBoundedMap(capacity int) *boundedMap {
	return &boundedMap{m: map[bpf.RedirectRouteKey]bpf.RedirectRouteValue{}, cap: capacity, fail: map[bpf.RedirectRouteKey]error{}}
}

func (b *boundedMap) Put(k []bpf.RedirectRouteKey, v []bpf.RedirectRouteValue) error {
	var failed KeyErrors
	for i := range k {
		b.ops = append(b.ops, "put "+DecodeKey(k[i]).String())
		if err := b.fail[k[i]]; err != nil {
			failed = append(failed, KeyError{i, err})
			continue
		}
		if _, ok := b.m[k[i]]; !ok && len(b.m) >= b.cap {
			failed = append(failed, KeyError{i, fmt.Errorf("%w: key too big for map", ErrMapFull)})
			continue
		}
		b.m[k[i]] = v[i]
	}
	if len(failed) > 0 {
		return failed
	}
	return nil
}

func (b *boundedMap) Delete(k []bpf.RedirectRouteKey) error {
	for _, x := range k {
		b.ops = append(b.ops, "delete "+DecodeKey(x).String())
		delete(b.m, x)
	}
	return nil
}

func (b *boundedMap) Keys() ([]bpf.RedirectRouteKey, error) {
	out := make([]bpf.RedirectRouteKey, 0, len(b.m))
	for k := range b.m {
		out = append(out, k)
	}
	return out, nil
}

// backendOf is the first backend address the map holds for target, or ""
// when the target has no entry.
func (b *boundedMap) backendOf(target string) string {
	k, _ := EncodeKey(netip.MustParseAddrPort(target))
	v, ok := b.m[k]
	if !ok {
		return ""
	}
	a, _ := DecodeBackend(v.Backends[0])
	return a.String()
}

// routesOnPorts is one route per target, target i on PS port first+i.
func routesOnPorts(n, first int) []registry.RouteState {
	out := make([]registry.RouteState, n)
	for i := range out {
		out[i] = route(fmt.Sprintf("127.77.0.%d:80", i+1), backend("ps1", fmt.Sprintf("127.0.0.1:%d", first+i), true))
	}
	return out
}

func TestStaleKeysAreDeletedBeforeNewRoutesAreWritten(t *testing.T) {
	ctx := context.Background()
	bm := newBoundedMap(4)
	rec := NewReconciler(bm, nil, nil, testTargets)
	if err := rec.Replace(ctx, routesOnPorts(4, 20000)); err != nil {
		t.Fatal(err)
	}
	// Four other targets: they fit only once the four old ones are gone.
	next := make([]registry.RouteState, 4)
	for i := range next {
		next[i] = route(fmt.Sprintf("127.77.1.%d:80", i+1), backend("ps1", fmt.Sprintf("127.0.0.1:%d", 21000+i), true))
	}
	bm.ops = nil
	if err := rec.Replace(ctx, next); err != nil {
		t.Fatal(err)
	}
	if err := rec.Health(); err != nil {
		t.Fatalf("health after a replace that fits: %v", err)
	}
	firstPut := -1
	for i, op := range bm.ops {
		if strings.HasPrefix(op, "put") && firstPut < 0 {
			firstPut = i
		}
		if strings.HasPrefix(op, "delete") && firstPut >= 0 {
			t.Fatalf("a delete after a put: %v", bm.ops)
		}
	}
	for _, rs := range next {
		if bm.backendOf(rs.Target.String()) == "" {
			t.Fatalf("%s missing; ops %v", rs.Target, bm.ops)
		}
	}
}

func TestAFailedKeyDoesNotStopTheOthersLeavesNoOldValueAndIsRetried(t *testing.T) {
	ctx := context.Background()
	bm := newBoundedMap(100)
	var logs bytes.Buffer
	rec := NewReconciler(bm, nil, slog.New(slog.NewTextHandler(&logs, nil)), testTargets)
	if err := rec.Replace(ctx, routesOnPorts(5, 20000)); err != nil {
		t.Fatal(err)
	}
	// Every route moves to new ports; the write of the third one fails.
	bad, _ := EncodeKey(netip.MustParseAddrPort("127.77.0.3:80"))
	bm.fail[bad] = errors.New("injected write failure")
	if err := rec.Update(ctx, routesOnPorts(5, 30000)); err != nil {
		t.Fatalf("a failed key must not fail the update (the reconciler reports it): %v", err)
	}
	for i := range 5 {
		target := fmt.Sprintf("127.77.0.%d:80", i+1)
		got, want := bm.backendOf(target), fmt.Sprintf("127.0.0.1:%d", 30000+i)
		if i == 2 {
			want = "" // fail closed: no route rather than the old port
		}
		if got != want {
			t.Fatalf("%s -> %q, want %q", target, got, want)
		}
	}
	st := rec.State()
	if st.Pending != 1 || st.Full || st.Errors[WriteOther] != 1 || rec.Health() == nil {
		t.Fatalf("state %+v, health %v", st, rec.Health())
	}
	rec.Retry()
	rec.Retry()
	if st := rec.State(); st.Pending != 1 || st.Errors[WriteOther] != 3 {
		t.Fatalf("after two failed retries: %+v", st)
	}
	if n := strings.Count(logs.String(), "route map writes failing"); n != 1 {
		t.Fatalf("logged %d times, want once per change of state:\n%s", n, logs.String())
	}
	delete(bm.fail, bad)
	rec.Retry()
	if got := bm.backendOf("127.77.0.3:80"); got != "127.0.0.1:30002" {
		t.Fatalf("after a successful retry: %q", got)
	}
	if err := rec.Health(); err != nil {
		t.Fatalf("health after recovery: %v", err)
	}
	if !strings.Contains(logs.String(), "recovered") {
		t.Fatalf("no recovery logged:\n%s", logs.String())
	}
}

func TestAFullMapFailsClosedSaysSoAndFillsFreedRoom(t *testing.T) {
	ctx := context.Background()
	bm := newBoundedMap(4)
	var logs bytes.Buffer
	rec := NewReconciler(bm, nil, slog.New(slog.NewTextHandler(&logs, nil)), testTargets)
	routes := routesOnPorts(7, 20000)
	if err := rec.Replace(ctx, routes); err != nil {
		t.Fatal(err)
	}
	st := rec.State()
	if len(bm.m) != 4 || st.Pending != 3 || !st.Full || st.Errors[WriteMapFull] != 3 {
		t.Fatalf("map %d entries, state %+v", len(bm.m), st)
	}
	if err := rec.Health(); err == nil || !strings.Contains(err.Error(), "full") {
		t.Fatalf("health: %v", err)
	}
	// A retry probes a full map with one write, not one per waiting route.
	bm.ops = nil
	rec.Retry()
	if len(bm.ops) != 1 {
		t.Fatalf("retry of a full map: %v", bm.ops)
	}
	if n := strings.Count(logs.String(), `msg="route map full`); n != 1 {
		t.Fatalf("logged %d times, want once:\n%s", n, logs.String())
	}
	// Port reuse: the first two routes are withdrawn and their PS ports
	// given to two of the waiting targets. No target may ever point at a
	// port that now serves another target.
	withdrawn := []registry.RouteState{route(routes[0].Target.String()), route(routes[1].Target.String())}
	for i := 4; i < 7; i++ {
		routes[i].Backends[0].Address = netip.MustParseAddrPort(fmt.Sprintf("127.0.0.1:%d", 20000+i-4))
	}
	if err := rec.Update(ctx, append(withdrawn, routes[4:]...)); err != nil {
		t.Fatal(err)
	}
	owner := map[string]string{}
	for k, v := range bm.m {
		a, _ := DecodeBackend(v.Backends[0])
		if prev, ok := owner[a.String()]; ok {
			t.Fatalf("port %s routed for %s and %s", a, prev, DecodeKey(k))
		}
		owner[a.String()] = DecodeKey(k).String()
	}
	for _, w := range withdrawn {
		if got := bm.backendOf(w.Target.String()); got != "" {
			t.Fatalf("withdrawn %s still routed to %s", w.Target, got)
		}
	}
	if st := rec.State(); len(bm.m) != 4 || st.Pending != 1 || !st.Full {
		t.Fatalf("after withdrawals: map %d entries, state %+v", len(bm.m), st)
	}
	// The last withdrawal makes room for the last waiting route.
	if err := rec.Update(ctx, []registry.RouteState{route(routes[2].Target.String())}); err != nil {
		t.Fatal(err)
	}
	if st := rec.State(); st.Pending != 0 || st.Full || rec.Health() != nil {
		t.Fatalf("after room was made: state %+v health %v", st, rec.Health())
	}
	if !strings.Contains(logs.String(), "recovered") {
		t.Fatalf("no recovery logged:\n%s", logs.String())
	}
}

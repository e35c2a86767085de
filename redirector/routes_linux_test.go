package redirector

import (
	"encoding/json"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/testutil"
)

// installForTest installs the programs into a fresh cgroup and pin dir,
// both removed when the test ends.
func installForTest(t *testing.T) *Installation {
	t.Helper()
	cg := testutil.NewCgroup(t)
	pin := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tr"))
	t.Cleanup(func() {
		if err := Uninstall(pin); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	in, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close() })
	return in
}

func routeValue(backends ...BackendSlot) bpf.RedirectRouteValue {
	var v bpf.RedirectRouteValue
	states := map[string]uint8{"live": stateLive, "draining": stateDraining, "dead": stateDead}
	for i, b := range backends {
		v.Backends[i] = bpf.RedirectBackend{Addr: be32(b.Address.Addr()), Port: be16(b.Address.Port()), State: states[b.State]}
	}
	return v
}

// ReadRoutes decodes the map and joins each backend with its PS deadline
// and suspect mark, as the connect hooks see them.
func TestReadRoutesDecodesTheKernelMap(t *testing.T) {
	in := installForTest(t)
	t1 := netip.MustParseAddrPort("198.18.1.11:9100")
	t2 := netip.MustParseAddrPort("198.18.1.12:22")
	b1 := netip.MustParseAddrPort("198.18.0.21:20001")
	b2 := netip.MustParseAddrPort("198.18.0.22:20001")
	b3 := netip.MustParseAddrPort("198.18.0.23:20001")
	k1, _ := EncodeKey(t1)
	k2, _ := EncodeKey(t2)
	m := NewKernelRouteMap(in.objs.TetherRoutes)
	if err := m.Put([]bpf.RedirectRouteKey{k1, k2},
		[]bpf.RedirectRouteValue{routeValue(BackendSlot{b1, "live"}, BackendSlot{b2, "draining"}), routeValue(BackendSlot{b3, "live"})}); err != nil {
		t.Fatal(err)
	}
	now := uint64(monotonicNow())
	// b1's PS address has a minute left; b3's has passed; b2's has none.
	for addr, dl := range map[netip.Addr]uint64{b1.Addr(): now + uint64(time.Minute), b3.Addr(): now - uint64(time.Second)} {
		k := be32(addr)
		if err := in.objs.TetherPsDeadline.Update(&k, &dl, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
	}
	if err := in.SetSuspectHold(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	sk := bpf.RedirectRouteKey{Addr: be32(b1.Addr()), Port: be16(b1.Port())}
	marked := now - uint64(2*time.Second)
	if err := in.objs.TetherSuspect.Update(&sk, &marked, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}

	routes, err := ReadRoutes(in.PinDir, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 2 || routes[0].Target != t1 || routes[1].Target != t2 {
		t.Fatalf("routes %+v, want %s and %s in order", routes, t1, t2)
	}
	r1 := routes[0].Backends
	if len(r1) != 2 || r1[0].Address != b1 || r1[0].State != "live" || r1[1].Address != b2 || r1[1].State != "draining" {
		t.Fatalf("backends of %s: %+v", t1, r1)
	}
	if r1[0].DeadlineLeftSeconds == nil || *r1[0].DeadlineLeftSeconds < 55 || *r1[0].DeadlineLeftSeconds > 60 || !r1[0].Usable {
		t.Errorf("b1: deadline %v usable %v, want ~60s left and usable", r1[0].DeadlineLeftSeconds, r1[0].Usable)
	}
	if s := r1[0].Suspect; s == nil || !s.WithinHoldDown || s.MarkedSecondsAgo < 1.9 || s.MarkedSecondsAgo > 10 {
		t.Errorf("b1 suspect mark %+v, want marked ~2s ago within the hold-down", s)
	}
	if r1[1].DeadlineLeftSeconds != nil || r1[1].Usable || r1[1].Suspect != nil {
		t.Errorf("b2 (draining, no deadline, unmarked): %+v", r1[1])
	}
	r2 := routes[1].Backends
	if len(r2) != 1 || r2[0].DeadlineLeftSeconds == nil || *r2[0].DeadlineLeftSeconds > 0 || r2[0].Usable {
		t.Errorf("b3 (deadline passed) must not be usable: %+v", r2)
	}

	one, err := ReadRoutes(in.PinDir, t2)
	if err != nil || len(one) != 1 || one[0].Target != t2 {
		t.Fatalf("ReadRoutes(%s): %+v %v", t2, one, err)
	}
	none, err := ReadRoutes(in.PinDir, netip.MustParseAddrPort("198.18.9.9:1"))
	if err != nil || len(none) != 0 {
		t.Fatalf("a target without an entry: %+v %v, want none", none, err)
	}
	if _, err := json.Marshal(routes); err != nil {
		t.Fatal(err)
	}
}

// bpftool prints backend states by name, thanks to the enum type in the
// route map's BTF.
func TestBpftoolPrintsBackendStatesByName(t *testing.T) {
	bpftool := testutil.RequireBinary(t, "bpftool")
	in := installForTest(t)
	k, _ := EncodeKey(netip.MustParseAddrPort("198.18.1.11:9100"))
	v := routeValue(BackendSlot{netip.MustParseAddrPort("198.18.0.21:20001"), "live"}, BackendSlot{netip.MustParseAddrPort("198.18.0.22:20001"), "dead"})
	if err := NewKernelRouteMap(in.objs.TetherRoutes).Put([]bpf.RedirectRouteKey{k}, []bpf.RedirectRouteValue{v}); err != nil {
		t.Fatal(err)
	}
	dump := func(name string) string {
		out, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(in.PinDir, name)).CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool map dump %s: %v\n%s", name, err, out)
		}
		return string(out)
	}
	routes := dump(bpf.RedirectMapTetherRoutes)
	for _, want := range []string{`"state": "BACKEND_LIVE"`, `"state": "BACKEND_DEAD"`, `"state": "BACKEND_UNUSED"`} {
		if !strings.Contains(routes, want) {
			t.Errorf("tether_routes dump lacks %s:\n%s", want, routes)
		}
	}
	// 198.18.1.11 in network byte order, read as a little-endian integer;
	// port 9100 likewise (see the README on reading bpftool output).
	if !strings.Contains(routes, `"addr": 184619718`) || !strings.Contains(routes, `"port": 35875`) {
		t.Errorf("tether_routes dump: the key is not 198.18.1.11:9100 as documented:\n%s", routes)
	}
	// The counters keep integer keys: the kernel refuses BTF for an array
	// map whose key is not an integer (array_map_check_btf), and an enum
	// key would leave the map without BTF, its dump in raw hex. With BTF,
	// bpftool prints them as JSON numbers; the README maps 0-4 to names.
	counters := dump(bpf.RedirectMapTetherCounters)
	if !strings.Contains(counters, `"key": 4,`) || !strings.Contains(counters, `"cpu": 0,`) {
		t.Errorf("tether_counters dump is not typed by BTF:\n%s", counters)
	}
}

// The route map of a version whose BTF typed the state as a plain byte
// (every version before the enum) has the same layout: an in-place upgrade
// reuses it, and the programs keep redirecting with its entries.
func TestARouteMapWithTheOldBTFIsReused(t *testing.T) {
	cg := testutil.NewCgroup(t)
	pin := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tr"))
	t.Cleanup(func() { _ = Uninstall(pin) })
	in, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	in.Close()
	// Replace the pinned route map by one made without the enum: the
	// committed objects of older versions described the value with __u8,
	// which is what a MapSpec without BTF amounts to for compatibility.
	routesPin := filepath.Join(pin, bpf.RedirectMapTetherRoutes)
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: "tether_routes", Type: ebpf.Hash, KeySize: 8, ValueSize: 32, MaxEntries: 1000, Flags: 1 /* BPF_F_NO_PREALLOC */})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	k, _ := EncodeKey(netip.MustParseAddrPort("198.18.1.11:9100"))
	v := routeValue(BackendSlot{netip.MustParseAddrPort("198.18.0.21:20001"), "live"})
	if err := old.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	if err := unpinAndPin(routesPin, old); err != nil {
		t.Fatal(err)
	}
	in2, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatalf("in-place upgrade over a route map with the old BTF: %v", err)
	}
	defer in2.Close()
	routes, err := ReadRoutes(pin, netip.AddrPort{})
	if err != nil || len(routes) != 1 || routes[0].Backends[0].State != "live" {
		t.Fatalf("routes after the upgrade: %+v %v", routes, err)
	}
}

// unpinAndPin replaces the map pinned at path by m.
func unpinAndPin(path string, m *ebpf.Map) error {
	cur, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return err
	}
	defer cur.Close()
	if err := cur.Unpin(); err != nil {
		return err
	}
	return m.Pin(path)
}

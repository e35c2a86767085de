package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
)

// A redirector synced with the registry: `routes` prints its map decoded,
// `routes --check` finds no difference, and after deliberate edits of the
// pinned map it reports exactly the edited entries. `status` shows the
// daemon running (then not, once stopped), its cgroup, programs and last
// sync; the change-to-map histogram records a change published later.
func TestRedirectorRoutesCheckFindsExactlyTheEditedEntries(t *testing.T) {
	testutil.RequirePrivileged(t)
	rd := testutil.StartRedis(t)
	ctx := context.Background()
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	until := time.Now().Add(time.Hour)
	for id, l := range map[string]registry.PSLease{
		"ps1": {ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: until},
		"ps2": {ID: "ps2", Addr: netip.MustParseAddr("127.0.0.2"), State: registry.PSDraining, ExpiresAt: until},
	} {
		if err := reg.RenewPS(ctx, l); err != nil {
			t.Fatalf("lease %s: %v", id, err)
		}
	}
	t1 := netip.MustParseAddrPort("127.77.0.1:9100")
	t2 := netip.MustParseAddrPort("127.77.0.2:9100")
	outside := netip.MustParseAddrPort("10.99.0.1:80") // not in --target-cidrs: kept out, not missing
	publish := func(ps string, target netip.AddrPort, port uint16) {
		t.Helper()
		if _, err := reg.Publish(ctx, ps, []registry.Publication{{Target: target, Port: port, AgentID: "a1"}}); err != nil {
			t.Fatal(err)
		}
	}
	publish("ps1", t1, 20001)
	publish("ps2", t1, 30001)
	publish("ps1", t2, 20002)
	publish("ps1", outside, 20003)

	cg := testutil.NewCgroup(t)
	pinDir := filepath.Join("/sys/fs/bpf", testutil.UniqueName("rr"))
	t.Cleanup(func() {
		if out, err := runTether(t, "redirector", "uninstall", "--pin-dir", pinDir); err != nil {
			t.Errorf("redirector uninstall: %v\n%s", err, out)
		}
	})
	metrics := freeAddr(t)
	// --resync 1h: no anti-entropy repairs the edits below during the test.
	rdr := startProc(t, "redirector", "redirector", "--redis", rd.URL(), "--cgroup", cg.Path, "--pin-dir", pinDir,
		"--target-cidrs", "127.77.0.0/16", "--resync", "1h", "--metrics", metrics)

	var routes []redirector.KernelRoute
	testutil.Eventually(t, 15*time.Second, "the kernel map holds both routes", func() error {
		out, err := runTether(t, "redirector", "routes", "--pin-dir", pinDir, "-o", "json")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if err := json.Unmarshal([]byte(out), &routes); err != nil {
			return fmt.Errorf("not JSON: %v\n%s", err, out)
		}
		if len(routes) != 2 {
			return fmt.Errorf("%d routes", len(routes))
		}
		return nil
	})
	r1 := routes[0]
	if r1.Target != t1 || len(r1.Backends) != 2 || r1.Backends[0].Address.String() != "127.0.0.1:20001" || r1.Backends[0].State != "live" ||
		r1.Backends[1].State != "draining" || !r1.Backends[0].Usable || r1.Backends[0].DeadlineLeftSeconds == nil {
		t.Fatalf("decoded route of %s: %+v", t1, r1)
	}
	table, err := runTether(t, "redirector", "routes", t1.String(), "--pin-dir", pinDir)
	if err != nil || !strings.Contains(table, "127.0.0.2:30001") || !strings.Contains(table, "draining") || strings.Contains(table, t2.String()) {
		t.Fatalf("routes %s (table): %v\n%s", t1, err, table)
	}
	if out, err := runTether(t, "redirector", "routes", "127.77.9.9:1", "--pin-dir", pinDir); err == nil || !strings.Contains(err.Error(), "no route for 127.77.9.9:1") {
		t.Fatalf("a target without an entry: want an error, got %v\n%s", err, out)
	}

	check := func() (redirector.RouteCheck, error) {
		t.Helper()
		out, err := runTether(t, "redirector", "routes", "--check", "--redis", rd.URL(), "--target-cidrs", "127.77.0.0/16",
			"--pin-dir", pinDir, "--settle", "200ms", "-o", "json")
		var res redirector.RouteCheck
		if jerr := json.Unmarshal([]byte(out), &res); jerr != nil {
			t.Fatalf("routes --check -o json: %v (%v)\n%s", jerr, err, out)
		}
		return res, err
	}
	res, err := check()
	if err != nil || len(res.Differences) != 0 || res.KernelRoutes != 2 || res.RegistryRoutes != 2 {
		t.Fatalf("a synced map: want no difference, got %+v (%v)", res, err)
	}
	// Without the redirector's --target-cidrs the route it kept out is
	// missing: the check applies the same rules, or it would not be exact.
	if out, err := runTether(t, "redirector", "routes", "--check", "--redis", rd.URL(), "--pin-dir", pinDir, "--settle", "0"); err == nil ||
		!strings.Contains(out, "missing") || !strings.Contains(out, outside.String()) {
		t.Fatalf("check without --target-cidrs: want %s missing, got %v\n%s", outside, err, out)
	}

	// Edit 1: one backend's port. Exactly that entry differs.
	routeMap, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.RedirectMapTetherRoutes), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer routeMap.Close()
	k1, _ := redirector.EncodeKey(t1)
	var v bpf.RedirectRouteValue
	if err := routeMap.Lookup(&k1, &v); err != nil {
		t.Fatal(err)
	}
	v.Backends[0].Port = netOrder(20009)
	if err := routeMap.Update(&k1, &v, ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	res, err = check()
	if !errors.Is(err, errRoutesDiffer) || len(res.Differences) != 1 {
		t.Fatalf("after editing a port: want exactly one difference and errRoutesDiffer, got %+v (%v)", res, err)
	}
	d := res.Differences[0]
	if d.Target != t1 || d.Kind != redirector.DiffBackends || len(d.Details) != 2 ||
		!strings.Contains(d.Details[0], "127.0.0.1:20001 (live) only in the registry") || !strings.Contains(d.Details[1], "127.0.0.1:20009 (live) only in the kernel map") {
		t.Fatalf("the edited entry: %+v", d)
	}

	// Edit 2: one entry deleted. It is missing; the first edit still shows.
	k2, _ := redirector.EncodeKey(t2)
	if err := routeMap.Delete(&k2); err != nil {
		t.Fatal(err)
	}
	out, err := runTether(t, "redirector", "routes", "--check", "--redis", rd.URL(), "--target-cidrs", "127.77.0.0/16", "--pin-dir", pinDir, "--settle", "200ms")
	if !errors.Is(err, errRoutesDiffer) || strings.Count(out, "\n") != 4 ||
		!strings.Contains(out, "missing     127.77.0.2:9100") || !strings.Contains(out, "backends    127.77.0.1:9100") {
		t.Fatalf("after deleting an entry: want the two edited entries, got %v\n%s", err, out)
	}

	// The daemon's state as status shows it. The redirector writes it
	// every second, so the first full sync shows within one.
	var st redirector.Status
	testutil.Eventually(t, 5*time.Second, "status shows the last full sync", func() error {
		if st = redirectorStatus(t, pinDir); st.Daemon.LastFullSyncSecondsAgo == nil {
			return fmt.Errorf("%+v", st.Daemon)
		}
		return nil
	})
	if !st.Daemon.Running || st.Daemon.PID != rdr.Cmd.Process.Pid || !st.Daemon.PIDExistsHere || st.Daemon.LastFullSyncSecondsAgo == nil {
		t.Fatalf("status of a running redirector: %+v", st.Daemon)
	}
	if st.Cgroup != cg.Path || len(st.Programs) < 4 || st.Programs[0].ProgramID == 0 || st.Capacity == 0 {
		t.Fatalf("status: cgroup %q (want %q), programs %+v, capacity %d", st.Cgroup, cg.Path, st.Programs, st.Capacity)
	}

	// A change published now reaches the map; the histogram times it.
	t3 := netip.MustParseAddrPort("127.77.0.3:9100")
	publish("ps1", t3, 20004)
	testutil.Eventually(t, 10*time.Second, "the change-to-map histogram records the change", func() error {
		mf := testutil.ScrapeFamilies(t, metrics)["tether_redirector_change_to_map_seconds"]
		if mf == nil || mf.GetMetric()[0].GetHistogram().GetSampleCount() == 0 {
			return fmt.Errorf("no observation yet")
		}
		h := mf.GetMetric()[0].GetHistogram()
		t.Logf("change to map: %d observations, mean %.2f ms", h.GetSampleCount(), 1000*h.GetSampleSum()/float64(h.GetSampleCount()))
		return nil
	})

	rdr.stop()
	testutil.Eventually(t, 10*time.Second, "status says the stopped redirector is not running", func() error {
		st := redirectorStatus(t, pinDir)
		if st.Daemon.Running || !strings.HasPrefix(st.Daemon.Verdict, "not running") || st.Daemon.PIDExistsHere {
			return fmt.Errorf("%+v", st.Daemon)
		}
		return nil
	})
	if out, err := runTether(t, "redirector", "status", "--pin-dir", pinDir); err != nil || !strings.Contains(out, "not running") || !strings.Contains(out, cg.Path) {
		t.Fatalf("status table of a stopped redirector: %v\n%s", err, out)
	}
}

func redirectorStatus(t *testing.T, pinDir string) redirector.Status {
	t.Helper()
	out, err := runTether(t, "redirector", "status", "--pin-dir", pinDir, "-o", "json")
	if err != nil {
		t.Fatalf("redirector status: %v\n%s", err, out)
	}
	var st redirector.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	return st
}

// netOrder is port as the route map holds it (network byte order, read
// in the host's byte order).
func netOrder(port uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], port)
	return binary.NativeEndian.Uint16(b[:])
}

package redirector_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/daemon"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
)

// startOwnRedirector runs a redirector in this process with cfg's changes,
// serving /metrics and /healthz (with its Health) on a free port, and
// returns it with that address and its log.
func (s *stack) startOwnRedirector(mod func(*redirector.Config)) (*redirector.Redirector, string, *tunneltest.LogBuf) {
	t := s.t
	t.Helper()
	cfg := redirector.DefaultConfig()
	cfg.Redis, cfg.Cgroup, cfg.PinDir = s.redis.URL(), s.cg.Path, s.pinDir
	cfg.TargetCIDRs = []string{testTargetCIDRs}
	log, lb := tunneltest.NewLog(t, "redirector")
	cfg.Logger = log
	preg := daemon.NewRegistry()
	cfg.Registerer = preg
	mod(&cfg)
	r, err := redirector.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	addrc := make(chan string, 1)
	go func() { _ = r.Run(ctx); done <- struct{}{} }()
	go func() {
		_ = daemon.ServeMetrics(ctx, "127.0.0.1:0", preg, log, func(a net.Addr) { addrc <- a.String() }, r.Health)
		done <- struct{}{}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
		r.Close()
		if t.Failed() {
			t.Logf("redirector log:\n%s", lb.String())
		}
	})
	select {
	case <-r.Ready():
	case <-time.After(15 * time.Second):
		t.Fatal("redirector never synced")
	}
	return r, <-addrc, lb
}

// httpGet returns the status and body of GET url.
func httpGet(url string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// kernelRoutes reads the whole pinned route map: target -> backend ports.
func (s *stack) kernelRoutes() (map[string][]string, error) {
	m, err := ebpf.LoadPinnedMap(s.pinDir+"/"+bpf.RedirectMapTetherRoutes, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	out := map[string][]string{}
	var k bpf.RedirectRouteKey
	var v bpf.RedirectRouteValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		var bs []string
		for _, b := range v.Backends {
			if a, st := redirector.DecodeBackend(b); st != "unused" {
				bs = append(bs, a.String()+"/"+st)
			}
		}
		out[redirector.DecodeKey(k).String()] = bs
	}
	return out, it.Err()
}

// fakeTargets are targets a fake PS publishes, on ports of its own.
func fakeTarget(i int) netip.AddrPort {
	return netip.MustParseAddrPort(fmt.Sprintf("127.77.9.%d:80", i))
}

// A route map of 4 entries and 7 routes in Redis: the map is full, which
// /healthz, the metrics, the log and `tether redirector status` say; a
// withdrawn route never survives in the kernel, even while the map is
// full and its port goes to another target, so its clients never reach
// the agent that now owns the port.
func TestAFullRouteMapFailsClosedAndSaysSo(t *testing.T) {
	s := newStack(t)
	ctx := context.Background()
	a1 := netip.MustParseAddrPort(target)
	var p1 uint16 // ps1's port for a1:9100, which answers "agent-a1"
	for _, b := range tunneltest.WaitBackends(t, s.reg, a1, 2) {
		if b.PSID == "ps1" {
			p1 = b.Address.Port()
		}
	}
	// A fake PS at the same address publishes five routes. The first,
	// old, holds p1: the binding the port had before a1 got it.
	if err := s.reg.RenewPS(ctx, registry.PSLease{ID: "psx", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	fakePorts := []uint16{p1}
	for range 4 {
		fakePorts = append(fakePorts, uint16(testutil.FreePort(t)))
	}
	pub := func(i int, port uint16) registry.Publication {
		return registry.Publication{Target: fakeTarget(i), Port: port, AgentID: fmt.Sprintf("fake%d", i)}
	}
	var pubs []registry.Publication
	for i, p := range fakePorts {
		pubs = append(pubs, pub(i+1, p))
	}
	if _, err := s.reg.Publish(ctx, "psx", pubs); err != nil {
		t.Fatal(err)
	}

	_, metrics, rlog := s.startOwnRedirector(func(c *redirector.Config) { c.MapSize = 4; c.Resync = time.Second })

	testutil.Eventually(t, 15*time.Second, "the overflow reported everywhere", func() error {
		st, err := redirector.ReadStatus(s.pinDir)
		if err != nil {
			return err
		}
		if st.Routes != 4 || st.Writes == nil || !st.Writes.MapFull || st.Writes.RoutesNotWritten != 3 {
			return fmt.Errorf("status: %d routes, writes %+v", st.Routes, st.Writes)
		}
		code, body, err := httpGet("http://" + metrics + "/healthz")
		if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, "route map full") {
			return fmt.Errorf("healthz: %d %q %v", code, body, err)
		}
		_, body, err = httpGet("http://" + metrics + "/metrics")
		if err != nil || !strings.Contains(body, "tether_redirector_map_full 1") || !strings.Contains(body, `tether_redirector_route_write_errors_total{reason="map_full"}`) {
			return fmt.Errorf("metrics lack the overflow: %v", err)
		}
		return nil
	})
	out, err := exec.Command(tetherBin, "redirector", "status", "--pin-dir", s.pinDir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "FULL: 3 routes not in the kernel map") {
		t.Fatalf("tether redirector status must show the overflow: %v\n%s", err, out)
	}

	// The old binding of p1 is withdrawn, with two more; their ports go
	// to two new targets at once (port reuse), so the map stays full.
	if err := s.reg.Release(ctx, "psx", pubs[:3], time.Now()); err != nil {
		t.Fatal(err)
	}
	reused := []registry.Publication{pub(11, fakePorts[1]), pub(12, fakePorts[2])}
	if _, err := s.reg.Publish(ctx, "psx", reused); err != nil {
		t.Fatal(err)
	}
	// Once the withdrawal is seen, and over several resyncs (1s) after
	// it, with the map still full: no withdrawn target is in the kernel
	// map and no backend routes two targets.
	check := func() error {
		routes, err := s.kernelRoutes()
		if err != nil {
			return err
		}
		if len(routes) > 4 {
			return fmt.Errorf("more routes than the map holds: %v", routes)
		}
		owner := map[string]string{}
		for tgt, bs := range routes {
			for i := 1; i <= 3; i++ {
				if tgt == fakeTarget(i).String() {
					return fmt.Errorf("withdrawn route %s in the kernel map: %v", tgt, bs)
				}
			}
			for _, b := range bs {
				if prev, ok := owner[b]; ok {
					return fmt.Errorf("backend %s routed for both %s and %s", b, prev, tgt)
				}
				owner[b] = tgt
			}
		}
		return nil
	}
	testutil.Eventually(t, 15*time.Second, "withdrawn routes gone from the full map", check)
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if err := check(); err != nil {
			t.Fatalf("while the map is full: %v", err)
		}
	}
	if st, err := redirector.ReadStatus(s.pinDir); err != nil || st.Writes == nil || !st.Writes.MapFull {
		t.Fatalf("the map must still be full here (6 routes, 4 entries): %+v %v", st.Writes, err)
	}
	// A client of the old target never reaches a1, which owns p1 now.
	for i := range 20 {
		if out, _ := s.goClient("dial", fakeTarget(1).String()); strings.Contains(out, "agent-a1") {
			t.Fatalf("attempt %d: a client of the withdrawn %s reached agent-a1:\n%s", i, fakeTarget(1), out)
		}
	}

	// Withdrawals make room: every route fits, and health comes back.
	if err := s.reg.Release(ctx, "psx", append(pubs[3:4], reused...), time.Now()); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 15*time.Second, "health back once every route fits", func() error {
		code, body, err := httpGet("http://" + metrics + "/healthz")
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("healthz: %d %q %v", code, body, err)
		}
		st, err := redirector.ReadStatus(s.pinDir)
		if err != nil || st.Writes == nil || st.Writes.MapFull || st.Writes.RoutesNotWritten != 0 || st.Routes != 3 {
			return fmt.Errorf("status %+v %v", st.Writes, err)
		}
		return nil
	})
	if out, err := s.goClient("dial", target); err != nil || !strings.Contains(out, "agent-a1") {
		t.Fatalf("a1 once the map has room: %v\n%s", err, out)
	}
	// Logged once per change of state: overflow and recovery alternate
	// (the withdrawal and the reuse are two registry changes, so the map
	// may fit in between), never the same twice in a row.
	var states []string
	for _, l := range strings.Split(rlog.String(), "\n") {
		switch {
		case strings.Contains(l, `msg="route map full`):
			states = append(states, "full")
		case strings.Contains(l, `msg="route map writes recovered`):
			states = append(states, "recovered")
		}
	}
	if len(states) < 2 || states[0] != "full" || states[len(states)-1] != "recovered" {
		t.Fatalf("want the overflow logged, then its recovery: %v\n%s", states, rlog.String())
	}
	for i := 1; i < len(states); i++ {
		if states[i] == states[i-1] {
			t.Fatalf("%q logged twice in a row (want once per change of state): %v\n%s", states[i], states, rlog.String())
		}
	}
}

// With the redirector killed (pins stay) and then a PS killed, the kernel
// map alone stops picking the dead PS's backends once its lease plus
// --kernel-grace has passed; a new redirector revives the live one.
func TestStaleKernelEntriesGoDeadWithoutARedirector(t *testing.T) {
	s := newStack(t)
	const grace = 5 * time.Second
	red, _ := s.startRedirectorCmd(false, "--target-cidrs", testTargetCIDRs, "--kernel-grace", grace.String())
	s.waitRoutes(2, "redirector synced")
	testutil.Eventually(t, 10*time.Second, "PS deadline in the kernel", func() error {
		st, err := redirector.ReadStatus(s.pinDir)
		if err != nil || st.Deadlines.PSAddresses != 1 || len(st.Deadlines.Lapsed) != 0 {
			return fmt.Errorf("deadlines %+v %v", st.Deadlines, err)
		}
		return nil
	})
	_ = red.Process.Kill()
	_ = red.Wait()
	redKilled := time.Now()
	// Right after: the kernel map serves on its own (leases of 2s plus
	// the grace are ahead).
	if out, err := s.goClient("dial", target); err != nil || !strings.Contains(out, "agent-a1") {
		t.Fatalf("right after the redirector died: %v\n%s", err, out)
	}
	// ps1 dies; its entries stay marked live in the map (nobody updates
	// it), until its deadline passes.
	_ = s.ps[0].Process.Kill()
	testutil.Eventually(t, 30*time.Second, "the dead PS no longer picked from the kernel map", func() error {
		out, _ := s.goClient("dial", target)
		if !strings.Contains(out, "no route to host") {
			return fmt.Errorf("got %q", out)
		}
		return nil
	})
	// The last refresh (at most 1.25s before the kill) saw a lease with
	// more than 1.25s left, so nothing may lapse before the grace.
	after := time.Since(redKilled)
	if after < grace {
		t.Fatalf("backends dead %v after the redirector died, before the grace of %v", after, grace)
	}
	st, err := redirector.ReadStatus(s.pinDir)
	if err != nil || len(st.Deadlines.Lapsed) != 1 || st.Counters["no_live_backend"] == 0 {
		t.Fatalf("status after the deadline: %+v %v", st, err)
	}
	t.Logf("FIGURE kernel_entries_dead_after_redirector_kill=%v (lease 2s, --kernel-grace %v)", after.Round(100*time.Millisecond), grace)

	// A new redirector refreshes the deadline of the live ps2 and marks
	// ps1 dead: a1 is reachable again, through ps2.
	s.startRedirectorCmd(false, "--target-cidrs", testTargetCIDRs, "--kernel-grace", grace.String())
	testutil.Eventually(t, 20*time.Second, "a1 reachable through ps2 after a restart", func() error {
		out, err := s.goClient("dial", target)
		if err != nil || !strings.Contains(out, "agent-a1") {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
}

// The kernel side of the deadlines, with no redirector at all: of a
// route's two live backends, the one whose PS address has a deadline in
// the past is never picked; one without an entry is not checked.
func TestTheKernelSkipsBackendsPastTheirPSDeadline(t *testing.T) {
	testutil.RequirePrivileged(t)
	s := &stack{t: t, cg: testutil.NewCgroup(t)}
	// The stack's client helpers need only its cgroup and pin dir.
	s.pinDir = "/sys/fs/bpf/" + testutil.UniqueName("tt")
	t.Cleanup(func() { _ = redirector.Uninstall(s.pinDir) })
	in, err := redirector.Install(s.pinDir, s.cg.Path, 100)
	if err != nil {
		t.Fatal(err)
	}
	in.Close()
	// Two "PS" at two addresses, each answering its own name.
	lnA, lnB := listenHTTP(t, "127.0.0.1:0", "ps-a"), listenHTTP(t, "127.0.0.2:0", "ps-b")
	routes, err := ebpf.LoadPinnedMap(s.pinDir+"/"+bpf.RedirectMapTetherRoutes, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer routes.Close()
	deadlines, err := ebpf.LoadPinnedMap(s.pinDir+"/"+bpf.RedirectMapTetherPsDeadline, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer deadlines.Close()
	tgt := netip.MustParseAddrPort("127.77.5.1:80")
	k, _ := redirector.EncodeKey(tgt)
	var v bpf.RedirectRouteValue
	for i, a := range []netip.AddrPort{lnA, lnB} {
		kb, _ := redirector.EncodeKey(a) // same layout: address and port in network order
		v.Backends[i] = bpf.RedirectBackend{Addr: kb.Addr, Port: kb.Port, State: uint8(bpf.RedirectBackendStateBACKEND_LIVE)}
	}
	if err := routes.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	setDeadline := func(a netip.AddrPort, d time.Duration) {
		kb, _ := redirector.EncodeKey(a)
		var ts unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		if err := deadlines.Put(kb.Addr, uint64(ts.Nano()+int64(d))); err != nil {
			t.Fatal(err)
		}
	}
	answers := func(n int) map[string]int {
		seen := map[string]int{}
		for range n {
			out, _ := s.goClient("dial", tgt.String())
			switch {
			case strings.Contains(out, "ps-a"):
				seen["ps-a"]++
			case strings.Contains(out, "ps-b"):
				seen["ps-b"]++
			default:
				seen[out]++
			}
		}
		return seen
	}
	// No entries: not checked, both picked (all 30 on one: odds 2^-29).
	if seen := answers(30); seen["ps-a"] == 0 || seen["ps-b"] == 0 {
		t.Fatalf("without deadlines both backends must be picked: %v", seen)
	}
	// A's PS past its deadline, B's an hour ahead: only B.
	setDeadline(lnA, -time.Second)
	setDeadline(lnB, time.Hour)
	if seen := answers(30); seen["ps-b"] != 30 {
		t.Fatalf("a backend past its PS deadline was picked: %v", seen)
	}
	// Both past: the route has no usable backend, connect is refused.
	setDeadline(lnB, -time.Second)
	if out, _ := s.goClient("dial", tgt.String()); !strings.Contains(out, "no route to host") {
		t.Fatalf("every backend past its deadline: want EHOSTUNREACH, got %q", out)
	}
}

// listenHTTP serves name on addr and returns the bound address.
func listenHTTP(t *testing.T, addr, name string) netip.AddrPort {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, name) })}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return netip.MustParseAddrPort(ln.Addr().String())
}

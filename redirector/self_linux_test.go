package redirector_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
)

// fakeServer accepts connections, answers a request line on each with its
// name and closes it, and counts them.
type fakeServer struct {
	addr     netip.AddrPort
	accepted atomic.Int64
}

func startFake(t *testing.T, name string) *fakeServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	f := &fakeServer{addr: netip.MustParseAddrPort(ln.Addr().String())}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.accepted.Add(1)
			go func() {
				defer c.Close()
				// Read the request first: closing with unread data would
				// reset the connection before the client reads the answer.
				_ = c.SetDeadline(time.Now().Add(ioTimeout))
				_, _ = bufio.NewReader(c).ReadString('\n')
				_, _ = fmt.Fprintf(c, "HTTP/1.0 200 OK\r\n\r\n%s\n", name)
			}()
		}
	}()
	return f
}

// publishVia publishes target as a route whose one backend is backend,
// held by a PS "psx" that exists only in the registry (a hostile or
// mistaken registration, without any tunnel behind it).
func publishVia(t *testing.T, reg *registry.Registry, target, backend netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lease := registry.PSLease{ID: "psx", Addr: backend.Addr(), State: registry.PSActive, ExpiresAt: time.Now().Add(time.Hour)}
	if err := reg.RenewPS(ctx, lease); err != nil {
		t.Fatal(err)
	}
	errs, err := reg.Publish(ctx, "psx", []registry.Publication{{Target: target, Port: backend.Port(), AgentID: "evil"}})
	if err == nil && len(errs) > 0 && errs[0] != nil {
		err = errs[0]
	}
	if err != nil {
		t.Fatalf("publish %s via psx: %v", target, err)
	}
}

// The redirector runs inside the cgroup it attaches to, and a route's
// target is the very Redis address the redirector uses: another process of
// the cgroup dialing that address is redirected, the redirector itself
// never is (it marks its own sockets, see MarkOwnSocket).
func TestTheRedirectorNeverRedirectsItsOwnRedisClient(t *testing.T) {
	s := newStack(t)
	redisAddr := netip.MustParseAddrPort(s.redis.Addr())
	fake := startFake(t, "captured-by-a-hostile-route")
	// The Redis address is loopback: named explicitly, as an operator would
	// have to.
	targets := testTargetCIDRs + "," + redisAddr.Addr().String() + "/32"
	first, _ := s.startRedirectorCmd(true, "--target-cidrs", targets)
	s.waitRoutes(2, "the redirector, in its own cgroup, synced the agent's routes")

	publishVia(t, s.reg, redisAddr, fake.addr)
	s.waitRoutes(3, "the route to the registry's own address in the map")

	// Another process of the cgroup dialing the Redis address is
	// redirected: the route is real and works.
	out, err := s.goClient("dial", redisAddr.String())
	if !strings.Contains(out, "captured-by-a-hostile-route") || !strings.Contains(out, "peer="+redisAddr.String()) {
		t.Fatalf("a client in the cgroup dialing %s must be redirected to the route's backend: %v\n%s", redisAddr, err, out)
	}

	// A new redirector in the same cgroup: the pinned map already holds
	// the route, so its very first connect() to Redis meets the hook.
	_ = first.Process.Kill()
	_ = first.Wait()
	second, log := s.startRedirectorCmd(true, "--target-cidrs", targets)
	// Only a redirector that reached the real Redis can put a route
	// published after its start into the map.
	later := netip.MustParseAddrPort("127.77.0.9:9100")
	publishVia(t, s.reg, later, fake.addr)
	testutil.Eventually(t, 15*time.Second, "the route published after the restart in the map", func() error {
		if second.ProcessState != nil {
			return fmt.Errorf("the redirector exited:\n%s", log.String())
		}
		_, err := s.mapRoute(later)
		return err
	})
	if n := fake.accepted.Load(); n != 1 {
		t.Fatalf("the hostile backend got %d connections, want 1 (the client's): the redirector's own Redis client was redirected\n%s", n, log.String())
	}
	if strings.Contains(log.String(), "captured") {
		t.Fatalf("the redirector's log shows it spoke to the hostile backend:\n%s", log.String())
	}
}

func TestCgroupIsRequiredAndTheRootIsRecognised(t *testing.T) {
	cfg := redirector.DefaultConfig()
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "--cgroup is required") || !strings.Contains(err.Error(), "e.g. --cgroup /sys/fs/cgroup/") {
		t.Fatalf("Validate without --cgroup: %v", err)
	}
	if _, err := redirector.ResolveCgroup(""); err == nil || !strings.Contains(err.Error(), "--cgroup is required") {
		t.Fatalf("ResolveCgroup(\"\"): %v", err)
	}
	cfg.Cgroup, cfg.TargetCIDRs = "/sys/fs/cgroup/unified/x", []string{"10.0.0.0/8", "127.77.0.0/33"}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "--target-cidrs") || !strings.Contains(err.Error(), "127.77.0.0/33") {
		t.Fatalf("Validate with a bad --target-cidrs: %v", err)
	}

	mnt, err := cgroup2.Mount()
	if err != nil {
		t.Skip(err)
	}
	if !redirector.IsRootCgroup(mnt) || !redirector.IsRootCgroup(mnt+"/") {
		t.Fatalf("%s is the root cgroup", mnt)
	}
	testutil.RequirePrivileged(t)
	if cg := testutil.NewCgroup(t); redirector.IsRootCgroup(cg.Path) {
		t.Fatalf("%s is not the root cgroup", cg.Path)
	}
}

func TestTheCommandWithoutCgroupSaysSoInOneLine(t *testing.T) {
	if tetherBin == "" {
		t.Skip("needs the tether binary (not built under -short)")
	}
	out, err := exec.Command(tetherBin, "redirector", "--redis", "redis://127.0.0.1:1/0").CombinedOutput()
	if err == nil {
		t.Fatalf("tether redirector without --cgroup must fail:\n%s", out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "--cgroup is required") || !strings.Contains(lines[0], "--cgroup /sys/fs/cgroup/") {
		t.Fatalf("want one line naming --cgroup with an example, got:\n%s", out)
	}
}

// Without --target-cidrs a loopback target stays out of the kernel map: a
// process of the cgroup reaches the real address, the skip is counted and
// logged once per target, not again at every anti-entropy resync.
func TestLoopbackTargetsAreNotRedirectedUnlessNamed(t *testing.T) {
	s := newStack(t)
	reg := prometheus.NewRegistry()
	log := s.startRedirector(func(c *redirector.Config) {
		c.TargetCIDRs = nil
		c.Registerer = reg
		c.Resync = time.Second
	})
	if st, err := redirector.ReadStatus(s.pinDir); err != nil || st.Routes != 0 {
		t.Fatalf("the map must hold no loopback route: %+v %v", st, err)
	}
	if out, _ := s.goClient("dial", target); !strings.Contains(out, "connection refused") {
		t.Fatalf("a loopback target not named must not be redirected (want the real address: refused): %s", out)
	}
	// Three resyncs at least: no more counts, no more warnings.
	full := func() float64 { return testutil.MetricValue(t, reg, "tether_mirror_full_loads_total") }
	start := full()
	testutil.Eventually(t, 20*time.Second, "three more full loads", func() error {
		if n := full(); n < start+3 {
			return fmt.Errorf("%v full loads", n)
		}
		return nil
	})
	if n := testutil.MetricValue(t, reg, "tether_redirector_routes_skipped_total", "reason", "target_not_allowed"); n != 2 {
		t.Fatalf("skipped %v targets, want 2 (%s and the echo port)", n, target)
	}
	if n := strings.Count(log.String(), "skipping a route whose target --target-cidrs does not allow"); n != 2 {
		t.Fatalf("%d warnings, want one per target:\n%s", n, log.String())
	}
}

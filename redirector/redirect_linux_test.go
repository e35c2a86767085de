package redirector_test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/redirector"
)

var target = fmt.Sprintf("%s:%d", agentIP, httpPort)

func TestUnmodifiedClientsInTheCgroupReachTheAgentByItsOwnIP(t *testing.T) {
	curl := testutil.RequireBinary(t, "curl")
	python := testutil.RequireBinary(t, "python3")
	bpftool := testutil.RequireBinary(t, "bpftool")
	s := newStack(t)
	s.startRedirector()

	out, err := s.inCgroup(nil, curl, "-sS", "--max-time", "5", "http://"+target+"/")
	if err != nil || strings.TrimSpace(out) != "agent-a1" {
		t.Fatalf("curl in the cgroup: %v\n%s", err, out)
	}

	out, err = s.goClient("dial", target)
	if err != nil || !strings.Contains(out, "peer="+target) || !strings.Contains(out, "agent-a1") {
		t.Fatalf("Go net.Dial in the cgroup must reach the agent and see it as its peer: %v\n%s", err, out)
	}

	script := fmt.Sprintf(`import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(("::ffff:%s", %d))
print("peer=%%s:%%d" %% s.getpeername()[:2])
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b: break
    data += b
print(data.decode().split("\r\n\r\n", 1)[1].strip())
`, agentIP, httpPort)
	out, err = s.inCgroup(nil, python, "-c", script)
	if err != nil || !strings.Contains(out, fmt.Sprintf("peer=::ffff:%s:%d", agentIP, httpPort)) || !strings.Contains(out, "agent-a1") {
		t.Fatalf("Python AF_INET6 to ::ffff:%s: %v\n%s", agentIP, err, out)
	}

	// Outside the cgroup nothing changes: the agent's address is not there.
	if out, err := exec.Command(curl, "-sS", "--max-time", "3", "http://"+target+"/").CombinedOutput(); err == nil {
		t.Fatalf("curl outside the cgroup must fail, got %s", out)
	}

	// A destination without a route is left alone.
	plain := startHTTP(t, "plain")
	before := s.counters()
	out, err = s.inCgroup(nil, curl, "-sS", "--max-time", "5", "http://"+plain+"/")
	if err != nil || strings.TrimSpace(out) != "plain" {
		t.Fatalf("a destination without a route must be untouched: %v\n%s", err, out)
	}
	after := s.counters()
	if after["no_route"] <= before["no_route"] || after["redirected"] != before["redirected"] {
		t.Fatalf("counters: before %v after %v", before, after)
	}
	if after["redirected"] < 3 || after["getpeername_rewritten"] < 2 {
		t.Fatalf("redirected/getpeername counters did not move: %v", after)
	}

	// bpftool prints the pinned maps readably, thanks to BTF.
	dump, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(s.pinDir, bpf.RedirectMapTetherRoutes)).CombinedOutput()
	if err != nil || !strings.Contains(string(dump), `"backends"`) || !strings.Contains(string(dump), `"state": "BACKEND_LIVE"`) {
		t.Fatalf("bpftool map dump: %v\n%s", err, dump)
	}
}

func TestDeadBackendsStopGettingConnectionsAndTheirSocketsAreDestroyed(t *testing.T) {
	t.Run("bpf_sock_destroy", func(t *testing.T) { testDeadBackends(t, false) })
	t.Run("netlink SOCK_DESTROY fallback", func(t *testing.T) { testDeadBackends(t, true) })
}

func testDeadBackends(t *testing.T, netlinkFallback bool) {
	s := newStack(t)
	var mods []func(*redirector.Config)
	if netlinkFallback {
		mods = append(mods, redirector.ForceNetlinkDestroy)
	}
	rlog := s.startRedirector(mods...)
	echo := fmt.Sprintf("%s:%d", agentIP, echoPort)

	// Twenty long-lived connections from inside the cgroup, spread over both PS.
	hold := s.startClient("hold", echo)
	if err := hold.waitLine("held", 30*time.Second); err != nil {
		t.Fatalf("client could not open its connections: %v", err)
	}

	// ps1 freezes: no RST, no FIN. Once its lease lapses, the redirector
	// marks it dead and destroys the sockets that went through it.
	if err := s.ps[0].Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "sockets through the frozen PS destroyed", func() error {
		if !strings.Contains(rlog.String(), "destroyed client sockets of dead backends") {
			return fmt.Errorf("none destroyed yet")
		}
		return nil
	})
	if !netlinkFallback && s.counters()["sockets_destroyed"] == 0 {
		t.Fatal("the sockets_destroyed counter did not move")
	}
	report, err := hold.finish()
	if err != nil {
		t.Fatalf("hold client: %v\n%s", err, report)
	}
	okN, errN := strings.Count(report, ": ok"), strings.Count(report, ": error")
	// 20 connections spread at random: all on one PS has odds of 2 in 10^6.
	if okN+errN != 20 || errN == 0 || okN == 0 {
		t.Fatalf("want some connections cut (through ps1) and the others working (ps2):\n%s", report)
	}
	// A destroyed socket fails at once (connection aborted); one left to
	// hang on the frozen PS would end in the client's own timeout.
	if strings.Contains(report, "i/o timeout") {
		t.Fatalf("a connection through the frozen PS was left hanging instead of destroyed:\n%s", report)
	}
	t.Logf("after freezing ps1: %d held connections destroyed, %d still working", errN, okN)

	// New connections all go to the live PS.
	for i := range 10 {
		if out, err := s.goClient("dial", target); err != nil || !strings.Contains(out, "agent-a1") {
			t.Fatalf("connection %d after ps1 died: %v\n%s", i, err, out)
		}
	}

	// Every backend dead: connect fails at once with EHOSTUNREACH.
	if err := s.ps[1].Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// "no route to host" comes from the program; a connect left alone would
	// hang until the client's timeout instead ("i/o timeout").
	testutil.Eventually(t, 10*time.Second, "connect fails with EHOSTUNREACH", func() error {
		out, _ := s.goClient("dial", target)
		if !strings.Contains(out, "no route to host") {
			return fmt.Errorf("got %q", out)
		}
		return nil
	})
	if s.counters()["no_live_backend"] == 0 {
		t.Fatal("no_live_backend counter did not move")
	}
	for _, p := range s.ps {
		_ = p.Process.Signal(syscall.SIGCONT)
	}
}

func TestAWithdrawnRouteIsNoLongerRedirected(t *testing.T) {
	s := newStack(t)
	s.startRedirector()
	if out, err := s.goClient("dial", target); err != nil {
		t.Fatalf("before withdraw: %v\n%s", err, out)
	}
	// Both PS drain (SIGTERM): they withdraw every route.
	for _, p := range s.ps {
		_ = p.Process.Signal(syscall.SIGTERM)
		_ = p.Wait()
	}
	s.waitRoutes(0, "route gone from the map")
	out, _ := s.goClient("dial", target)
	if !strings.Contains(out, "connection refused") {
		t.Fatalf("without a route the connect must go to the real address (refused): %s", out)
	}
}

// testTargetCIDRs names the loopback range of the tests' agents: loopback
// targets are redirected only when named.
const testTargetCIDRs = "127.77.0.0/16"

// startRedirectorProc runs `tether redirector` on the stack; the test ends
// it (by kill, if it still runs) and shows its log when it failed.
func (s *stack) startRedirectorProc() *exec.Cmd {
	cmd, _ := s.startRedirectorCmd(false, "--target-cidrs", testTargetCIDRs)
	return cmd
}

// startRedirectorCmd runs `tether redirector` on the stack with extra
// flags, inside the test cgroup when inCgroup is set.
func (s *stack) startRedirectorCmd(inCgroup bool, extra ...string) (*exec.Cmd, *tunneltest.LogBuf) {
	t := s.t
	t.Helper()
	cmd := exec.Command(tetherBin, append([]string{"redirector", "--redis", s.redis.URL(), "--cgroup", s.cg.Path,
		"--pin-dir", s.pinDir, "--map-size", "10000"}, extra...)...)
	log := &tunneltest.LogBuf{}
	cmd.Stdout, cmd.Stderr = log, log
	done := func() {}
	if inCgroup {
		done = s.cg.Command(t, cmd)
	}
	err := cmd.Start()
	done()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("redirector (pid %d) log:\n%s", cmd.Process.Pid, log.String())
		}
	})
	return cmd, log
}

func TestRedirectorRestartDropsNoConnection(t *testing.T) {
	bpftool := testutil.RequireBinary(t, "bpftool")
	s := newStack(t)
	first := s.startRedirectorProc()
	s.waitRoutes(2, "first redirector synced")

	// The client loops over the restart; it is under way once it says so.
	loop := s.startClient("loop", target)
	if err := loop.waitLine("running", 30*time.Second); err != nil {
		out, _ := loop.finish()
		t.Fatalf("client loop before the restart: %v\n%s", err, out)
	}
	_ = first.Process.Kill()
	_ = first.Wait()
	second := s.startRedirectorProc()

	// The pinned links and map go on redirecting with no redirector at all,
	// so the loop alone cannot tell a working second redirector from a dead
	// one. A route published after the restart can: only a live redirector
	// puts it in the map.
	newTarget := netip.MustParseAddrPort("127.77.0.2:9100")
	tunneltest.StartAgent(t, "a2", newTarget.Addr().String(), s.servers,
		[]string{fmt.Sprintf("%d=%s", newTarget.Port(), startHTTP(t, "agent-a2"))}, nil)
	tunneltest.WaitBackends(t, s.reg, newTarget, 2)
	testutil.Eventually(t, 15*time.Second, "the route published after the restart in the pinned map", func() error {
		v, err := s.mapRoute(newTarget)
		if err != nil {
			return err
		}
		live := 0
		for _, b := range v.Backends {
			if _, st := redirector.DecodeBackend(b); st == "live" {
				live++
			}
		}
		if live != 2 {
			return fmt.Errorf("%d live backends: %+v", live, v.Backends)
		}
		return nil
	})
	if out, err := s.goClient("dial", newTarget.String()); err != nil || !strings.Contains(out, "peer="+newTarget.String()) || !strings.Contains(out, "agent-a2") {
		t.Fatalf("the route published after the restart must be reachable from the cgroup: %v\n%s", err, out)
	}

	out, err := loop.finish()
	if err != nil || !strings.Contains(out, "failed=0 ") || strings.Contains(out, "ok=0 ") {
		t.Fatalf("client loop across a redirector restart: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	t.Logf("FIGURE redirector_restart_failed_connections=0 (%s)", lines[len(lines)-1])

	// The second redirector ran all along and stops cleanly on SIGTERM.
	if err := second.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("the second redirector is no longer running: %v", err)
	}
	if err := waitExit(second, 15*time.Second); err != nil {
		t.Fatalf("the second redirector on SIGTERM: %v (want exit status 0)", err)
	}

	s.uninstallDetaches(bpftool)
}

// uninstallDetaches checks that the programs are attached until uninstall,
// and that nothing is attached, pinned or redirected after it.
func (s *stack) uninstallDetaches(bpftool string) {
	t := s.t
	t.Helper()
	show, err := exec.Command(bpftool, "cgroup", "show", s.cg.Path).CombinedOutput()
	if err != nil || !strings.Contains(string(show), "connect4") {
		t.Fatalf("bpftool cgroup show before uninstall must list connect4: %v\n%s", err, show)
	}
	if out, err := exec.Command(tetherBin, "redirector", "uninstall", "--cgroup", s.cg.Path, "--pin-dir", s.pinDir).CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if _, err := os.Stat(s.pinDir); !os.IsNotExist(err) {
		t.Fatalf("pins left behind: %v", err)
	}
	show, err = exec.Command(bpftool, "cgroup", "show", s.cg.Path).CombinedOutput()
	if err != nil || strings.Contains(string(show), "tether") || strings.Contains(string(show), "connect") {
		t.Fatalf("programs still attached after uninstall (or bpftool failed): %v\n%s", err, show)
	}
	if out, _ := s.goClient("dial", target); !strings.Contains(out, "connection refused") {
		t.Fatalf("after uninstall the connect must not be redirected: %s", out)
	}
}

// Package e2e proves tether the way its users meet it: a simulated company
// network (test/netsim) with two VPCs, a PS pool behind a VIP, agents on the
// hosts, and a client on the central host reaching each agent by its own IP
// through the eBPF redirector — under failure too.
package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/test/netsim"
)

var tetherBin string

func TestMain(m *testing.M) {
	netsim.MaybeServeIdentity()
	if mode := os.Getenv(clientEnv); mode != "" {
		os.Exit(clientMain(mode, os.Args[len(os.Args)-1]))
	}
	dir, err := os.MkdirTemp("", "tether-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tetherBin = filepath.Join(dir, "tether")
	if out, err := exec.Command("go", "build", "-o", tetherBin, "../../cmd/tether").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build tether: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// world is the running system on the simulated network.
type world struct {
	*netsim.System
	t  *testing.T
	cg *testutil.Cgroup
}

var agents = netsim.Agents

func newWorld(t *testing.T) *world {
	testutil.RequirePrivileged(t)
	for _, b := range []string{"nft", "nsenter", "curl", "redis-server"} {
		testutil.RequireBinary(t, b)
	}
	n, err := netsim.Build(netsim.NewPrefix())
	if err != nil {
		t.Fatal(err)
	}
	cg := testutil.NewCgroup(t)
	sys, err := netsim.NewSystem(n, tetherBin, t.TempDir(), cg.Path, filepath.Join("/sys/fs/bpf", testutil.UniqueName("te")))
	if err != nil {
		t.Fatal(err)
	}
	w := &world{System: sys, t: t, cg: cg}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range n.Procs() {
				t.Logf("---- log of %s ----\n%s", p.Name, tail(p.Log(), 4000))
			}
		}
		_ = w.Uninstall()
		if err := n.Close(); err != nil {
			t.Errorf("tear down network: %v", err)
		}
	})
	self, _ := os.Executable()
	if err := sys.StartAll(t.Context(), self); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *world) must(p *netsim.Proc, err error) *netsim.Proc {
	w.t.Helper()
	if err != nil {
		w.t.Fatal(err)
	}
	return p
}

func (w *world) start(name, host string, opts netsim.StartOpts, bin string, args ...string) *netsim.Proc {
	w.t.Helper()
	p := w.must(w.N.Start(name, host, opts, bin, args...))
	w.Procs[name] = p
	return p
}

func (w *world) waitBackends(target string, n int) {
	w.t.Helper()
	if _, err := w.WaitBackends(w.t.Context(), target, n, 30*time.Second); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) waitRedirector(n int) {
	w.t.Helper()
	if err := w.WaitRedirector(w.t.Context(), n, 20*time.Second); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) curl(inCgroup bool, url string) (string, error) { return w.Curl(inCgroup, url) }

func (w *world) route(target string) (netsim.RouteJSON, error) { return w.Route(target) }

// loop starts a client in the cgroup on central that requests every agent
// over and over for d, checking every answer.
func (w *world) loop(d time.Duration) *netsim.Proc {
	self, _ := os.Executable()
	var targets []string
	for host := range agents {
		targets = append(targets, w.Target(host)+"="+host)
	}
	return w.start("client-loop", "central", netsim.StartOpts{Cgroup: w.cg.Path, Env: []string{clientEnv + "=loop", "E2E_DURATION=" + d.String()}},
		self, "-test.run=^$", strings.Join(targets, ","))
}

func (w *world) loopResult(p *netsim.Proc) loopStats {
	w.t.Helper()
	if err := p.Wait(time.Minute); err != nil {
		w.t.Fatalf("client loop: %v\n%s", err, p.Log())
	}
	var s loopStats
	if err := json.Unmarshal([]byte(lastLine(p.Log())), &s); err != nil {
		w.t.Fatalf("client loop output: %v\n%s", err, p.Log())
	}
	return s
}

func TestCompanyNetwork(t *testing.T) {
	w := newWorld(t)

	t.Run("the client in the cgroup reaches every agent by its own IP, nothing else changes", func(t *testing.T) {
		for host := range agents {
			out, err := w.curl(true, "http://"+w.Target(host)+"/")
			if err != nil || out != host {
				t.Fatalf("curl %s from the client cgroup: %v %q", w.Target(host), err, out)
			}
			if out, err := w.curl(false, "http://"+w.Target(host)+"/"); err == nil {
				t.Fatalf("curl outside the cgroup must fail (central cannot reach vpc hosts), got %q", out)
			}
		}
		out, err := w.N.Run("a1", "curl", "-sS", "--max-time", "2", "http://"+w.Target("b1")+"/")
		if err == nil {
			t.Fatalf("vpc-a reached vpc-b: %s", out)
		}
	})

	t.Run("each agent's two tunnels sit on distinct PS nodes", func(t *testing.T) {
		for host := range agents {
			r, err := w.route(w.Target(host))
			if err != nil {
				t.Fatal(err)
			}
			if len(r.Backends) != 2 || r.Backends[0].PSID == r.Backends[1].PSID {
				t.Fatalf("%s: %+v", host, r.Backends)
			}
			for _, b := range r.Backends {
				if b.AgentID != host {
					t.Fatalf("%s route held by %q", host, b.AgentID)
				}
			}
		}
	})

	t.Run("bad input on the wire is refused and the others keep working", func(t *testing.T) {
		loop := w.loop(6 * time.Second)
		// Garbage to the VIP's tunnel port.
		out, _ := w.N.Run("a1", "bash", "-c", "exec 3<>/dev/tcp/198.18.0.10/7000; head -c 4096 /dev/urandom >&3; timeout 2 cat <&3 >/dev/null; true")
		_ = out
		// A wrong token.
		bad := filepath.Join(w.t.TempDir(), "bad-token")
		_ = os.WriteFile(bad, []byte("not-the-token\n"), 0o600)
		wrong := w.start("agent-wrong-token", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "intruder1", "--ip", "198.18.1.11",
			"--expose", "8081", "--server", "198.18.0.10:7000", "--token-file", bad, "--tunnels", "1")
		// A claim on another agent's IP and port.
		claim := w.start("agent-claim", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "intruder2", "--ip", w.N.Hosts["a2"].IP.String(),
			"--expose", fmt.Sprint(netsim.AgentPort), "--server", "198.18.0.10:7000", "--token-file", w.AgentTokenFile(), "--tunnels", "1")
		testutil.Eventually(t, 15*time.Second, "refusals logged", func() error {
			if !strings.Contains(strings.ToLower(wrong.Log()), "token") {
				return fmt.Errorf("wrong-token agent log: %s", tail(wrong.Log(), 500))
			}
			if !strings.Contains(strings.ToLower(claim.Log()), "held by") && !strings.Contains(strings.ToLower(claim.Log()), "conflict") {
				return fmt.Errorf("claiming agent log: %s", tail(claim.Log(), 500))
			}
			return nil
		})
		wrong.Stop()
		claim.Stop()
		r, err := w.route(w.Target("a2"))
		if err != nil || len(r.Backends) != 2 || r.Backends[0].AgentID != "a2" || r.Backends[1].AgentID != "a2" {
			t.Fatalf("a2's route changed hands: %+v %v", r, err)
		}
		s := w.loopResult(loop)
		t.Logf("during bad input: %+v", s)
		if s.Failed != 0 || s.Wrong != 0 || s.OK == 0 {
			t.Fatalf("other agents were disturbed by bad input: %+v", s)
		}
	})

	t.Run("200 exposed endpoints across the agents are all reachable", func(t *testing.T) {
		var all []string
		for i, host := range []string{"a1", "a2", "b1"} {
			var args []string
			ip := w.N.Hosts[host].IP.String()
			count := []int{70, 70, 60}[i]
			for p := range count {
				port := 9000 + p
				args = append(args, "--expose", fmt.Sprintf("%d=%s:%d", port, ip, netsim.AgentPort))
				all = append(all, fmt.Sprintf("%s:%d=%s", ip, port, host))
			}
			base := []string{"agent", "--id", host + "-bulk", "--ip", ip, "--token-file", w.AgentTokenFile()}
			for _, s := range agents[host] {
				base = append(base, "--server", s)
			}
			w.start("agent-"+host+"-bulk", host, netsim.StartOpts{}, tetherBin, append(base, args...)...)
		}
		testutil.Eventually(t, 30*time.Second, "200 routes registered", func() error {
			out, err := w.N.Run("central", tetherBin, "routes", "list", "--redis", netsim.RedisURL, "-o", "json")
			if err != nil {
				return err
			}
			var rs []netsim.RouteJSON
			if err := json.Unmarshal(out, &rs); err != nil {
				return err
			}
			if len(rs) < 203 {
				return fmt.Errorf("%d routes", len(rs))
			}
			return nil
		})
		self, _ := os.Executable()
		p := w.start("client-scale", "central", netsim.StartOpts{Cgroup: w.cg.Path, Env: []string{clientEnv + "=each"}},
			self, "-test.run=^$", strings.Join(all, ","))
		if err := p.Wait(time.Minute); err != nil {
			t.Fatalf("scale client: %v\n%s", err, tail(p.Log(), 3000))
		}
		if !strings.Contains(p.Log(), "ok=200 failed=0") {
			t.Fatalf("not all 200 endpoints reachable:\n%s", tail(p.Log(), 3000))
		}
	})

	t.Run("a PS drain (SIGTERM) fails no request", func(t *testing.T) {
		loop := w.loop(6 * time.Second)
		time.Sleep(time.Second) // let the loop run before the drain (not a synchronisation)
		ps1 := w.Procs["ps1"]
		_ = ps1.Signal(syscall.SIGTERM)
		if err := ps1.Wait(20 * time.Second); err != nil {
			t.Fatalf("ps1 did not finish draining: %v", err)
		}
		s := w.loopResult(loop)
		t.Logf("FIGURE ps_drain_failed_requests=%d ok=%d", s.Failed, s.OK)
		if s.Failed != 0 || s.Wrong != 0 {
			t.Fatalf("requests failed during a drain: %+v", s)
		}
		w.must(w.StartPS("ps1"))
		for host := range agents {
			w.waitBackends(w.Target(host), 2)
		}
	})

	t.Run("kill -9 of a PS costs seconds and misroutes nothing", func(t *testing.T) {
		loop := w.loop(10 * time.Second)
		time.Sleep(time.Second)
		w.Procs["ps2"].Stop() // SIGKILL
		s := w.loopResult(loop)
		t.Logf("FIGURE ps_kill_longest_failure_window=%v failure_span=%v failed=%d ok=%d", time.Duration(s.LongestFailureMS)*time.Millisecond, time.Duration(s.FailureSpanMS)*time.Millisecond, s.Failed, s.OK)
		if s.Wrong != 0 {
			t.Fatalf("a response came from the wrong host: %+v", s)
		}
		if s.OK == 0 {
			t.Fatalf("no request succeeded after the kill: %+v", s)
		}
		for host := range agents {
			if out, err := w.curl(true, "http://"+w.Target(host)+"/"); err != nil || out != host {
				t.Fatalf("%s not reachable through the surviving PS: %v %q", host, err, out)
			}
		}
		restarted := time.Now()
		w.must(w.StartPS("ps2"))
		for host := range agents {
			w.waitBackends(w.Target(host), 2)
		}
		t.Logf("FIGURE ps_restart_to_two_backends_everywhere=%v", time.Since(restarted).Round(100*time.Millisecond))
	})

	t.Run("Redis, redirector and agent restarts resume by themselves", func(t *testing.T) {
		// Redirector: killed and restarted under load — zero failures.
		loop := w.loop(5 * time.Second)
		time.Sleep(time.Second)
		w.Procs["redirector"].Stop()
		w.must(w.StartRedirector())
		w.waitRedirector(len(agents))
		s := w.loopResult(loop)
		t.Logf("FIGURE redirector_restart_failed_requests=%d ok=%d", s.Failed, s.OK)
		if s.Failed != 0 || s.Wrong != 0 {
			t.Fatalf("a redirector restart must fail nothing: %+v", s)
		}

		// Redis: stopped and started again with the same data.
		loop = w.loop(8 * time.Second)
		time.Sleep(time.Second)
		redis := w.Procs["redis"]
		_ = redis.Signal(syscall.SIGTERM)
		_ = redis.Wait(10 * time.Second)
		if err := w.StartRedis(t.Context()); err != nil {
			t.Fatal(err)
		}
		s = w.loopResult(loop)
		t.Logf("FIGURE redis_restart_longest_failure_window=%v failure_span=%v failed=%d ok=%d", time.Duration(s.LongestFailureMS)*time.Millisecond, time.Duration(s.FailureSpanMS)*time.Millisecond, s.Failed, s.OK)
		if s.Wrong != 0 || s.OK == 0 {
			t.Fatalf("after a Redis restart: %+v", s)
		}
		for host := range agents {
			w.waitBackends(w.Target(host), 2)
		}

		// Agent: killed and started again.
		loop = w.loop(8 * time.Second)
		time.Sleep(time.Second)
		w.Procs["agent-a1"].Stop()
		w.must(w.StartAgent("a1"))
		s = w.loopResult(loop)
		t.Logf("FIGURE agent_restart_longest_failure_window=%v failure_span=%v failed=%d ok=%d", time.Duration(s.LongestFailureMS)*time.Millisecond, time.Duration(s.FailureSpanMS)*time.Millisecond, s.Failed, s.OK)
		if s.Wrong != 0 || s.OK == 0 {
			t.Fatalf("after an agent restart: %+v", s)
		}
		w.waitBackends(w.Target("a1"), 2)
		if out, err := w.curl(true, "http://"+w.Target("a1")+"/"); err != nil || out != "a1" {
			t.Fatalf("a1 after its restart: %v %q", err, out)
		}
	})

	t.Run("uninstall leaves no pins or attachments", func(t *testing.T) {
		w.Procs["redirector"].Stop()
		out, err := exec.Command(tetherBin, "redirector", "uninstall", "--cgroup", w.Cgroup, "--pin-dir", w.PinDir).CombinedOutput()
		if err != nil {
			t.Fatalf("uninstall: %v %s", err, out)
		}
		if _, err := redirector.ReadStatus(w.PinDir); err == nil {
			t.Fatal("pins still readable after uninstall")
		}
		if out, err := w.curl(true, "http://"+w.Target("a1")+"/"); err == nil {
			t.Fatalf("still redirected after uninstall: %s", out)
		}
	})
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

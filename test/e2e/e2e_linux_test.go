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

const (
	token     = "e2e-secret-token"
	redisURL  = "redis://198.18.3.10:6379/0"
	agentPort = 8080
)

// world is the running system on the simulated network.
type world struct {
	t      *testing.T
	n      *netsim.Network
	dir    string
	cg     *testutil.Cgroup
	pinDir string
	procs  map[string]*netsim.Proc
}

// agents are the hosts running an agent, with the servers each is given:
// the VIP, and for a2 a DNS-style list of two VIP addresses.
var agents = map[string][]string{
	"a1": {"198.18.0.10:7000"},
	"a2": {"198.18.0.10:7000", "198.18.0.11:7000"},
	"b1": {"198.18.0.10:7000"},
}

func newWorld(t *testing.T) *world {
	testutil.RequirePrivileged(t)
	for _, b := range []string{"nft", "ip", "curl", "redis-server"} {
		testutil.RequireBinary(t, b)
	}
	n, err := netsim.Build(netsim.NewPrefix())
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, n: n, dir: t.TempDir(), cg: testutil.NewCgroup(t), procs: map[string]*netsim.Proc{},
		pinDir: filepath.Join("/sys/fs/bpf", testutil.UniqueName("te"))}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range n.Procs() {
				t.Logf("---- log of %s ----\n%s", p.Name, tail(p.Log(), 4000))
			}
		}
		_ = exec.Command(tetherBin, "redirector", "uninstall", "--cgroup", w.cg.Path, "--pin-dir", w.pinDir).Run()
		if err := n.Close(); err != nil {
			t.Errorf("tear down network: %v", err)
		}
	})
	if err := os.WriteFile(filepath.Join(w.dir, "tokens"), []byte(token+" 198.18.0.0/15\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.dir, "agent-token"), []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	w.startRedis()
	w.startPS("ps1")
	w.startPS("ps2")
	self, _ := os.Executable()
	for host := range agents {
		addr := fmt.Sprintf("%s:%d", n.Hosts[host].IP, agentPort)
		w.start("http-"+host, host, netsim.StartOpts{Env: []string{netsim.IdentityEnvFor(addr, host)}}, self)
		w.startAgent(host)
	}
	for host := range agents {
		w.waitBackends(w.target(host), 2)
	}
	w.startRedirector()
	w.waitRedirector(len(agents))
	return w
}

// waitRedirector waits until the route map holds at least n routes.
func (w *world) waitRedirector(n int) {
	w.t.Helper()
	testutil.Eventually(w.t, 20*time.Second, "redirector synced", func() error {
		if p := w.procs["redirector"]; p.Exited() {
			w.t.Fatalf("redirector exited:\n%s", p.Log())
		}
		st, err := redirector.ReadStatus(w.pinDir)
		if err != nil {
			return err
		}
		if st.Routes < n {
			return fmt.Errorf("%d routes in the map", st.Routes)
		}
		return nil
	})
}

func (w *world) start(name, host string, opts netsim.StartOpts, bin string, args ...string) *netsim.Proc {
	w.t.Helper()
	p, err := w.n.Start(name, host, opts, bin, args...)
	if err != nil {
		w.t.Fatal(err)
	}
	w.procs[name] = p
	return p
}

func (w *world) startRedis() {
	w.start("redis", "central", netsim.StartOpts{}, "redis-server", "--bind", "198.18.3.10", "--port", "6379",
		"--dir", w.dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no")
	if err := w.n.WaitTCP(w.t.Context(), "central", "198.18.3.10:6379", 10*time.Second); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) startPS(name string) {
	ip := w.n.Hosts[name].IP.String()
	w.start(name, name, netsim.StartOpts{}, tetherBin, "ps", "--id", name, "--listen", ip+":7000", "--advertise", ip,
		"--ports", "20000-20999", "--redis", redisURL, "--token-file", filepath.Join(w.dir, "tokens"),
		"--allow-clients", "198.18.3.0/24", "--lease", "3s", "--renew", "500ms", "--drain-timeout", "5s")
}

func (w *world) startAgent(host string, extra ...string) *netsim.Proc {
	args := []string{"agent", "--id", host, "--ip", w.n.Hosts[host].IP.String(), "--expose", fmt.Sprint(agentPort),
		"--token-file", filepath.Join(w.dir, "agent-token"), "--backoff-min", "100ms", "--backoff-max", "1s"}
	for _, s := range agents[host] {
		args = append(args, "--server", s)
	}
	return w.start("agent-"+host, host, netsim.StartOpts{}, tetherBin, append(args, extra...)...)
}

func (w *world) startRedirector() *netsim.Proc {
	return w.start("redirector", "central", netsim.StartOpts{}, tetherBin, "redirector", "--redis", redisURL,
		"--cgroup", w.cg.Path, "--pin-dir", w.pinDir, "--map-size", "100000", "--resync", "10s")
}

func (w *world) target(host string) string {
	return fmt.Sprintf("%s:%d", w.n.Hosts[host].IP, agentPort)
}

// curl runs a plain curl on the central host, in the client cgroup or not.
func (w *world) curl(inCgroup bool, url string) (string, error) {
	cmd := w.n.Command("central", "curl", "-sS", "--max-time", "3", url)
	if inCgroup {
		done := w.cg.Command(w.t, cmd)
		defer done()
	}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

type routeJSON struct {
	Target   string `json:"target"`
	Backends []struct {
		PSID    string `json:"ps_id"`
		Address string `json:"address"`
		AgentID string `json:"agent_id"`
	} `json:"backends"`
}

func (w *world) route(target string) (routeJSON, error) {
	var r routeJSON
	out, err := w.n.Run("central", tetherBin, "routes", "get", target, "--redis", redisURL, "-o", "json")
	if err != nil {
		return r, fmt.Errorf("%v: %s", err, out)
	}
	return r, json.Unmarshal(out, &r)
}

// waitBackends waits until target has n backends on n distinct PS nodes.
func (w *world) waitBackends(target string, n int) time.Duration {
	w.t.Helper()
	start := time.Now()
	testutil.Eventually(w.t, 30*time.Second, fmt.Sprintf("%s has %d backends", target, n), func() error {
		r, err := w.route(target)
		if err != nil {
			return err
		}
		ps := map[string]bool{}
		for _, b := range r.Backends {
			ps[b.PSID] = true
		}
		if len(r.Backends) != n || len(ps) != n {
			return fmt.Errorf("backends %+v", r.Backends)
		}
		return nil
	})
	return time.Since(start)
}

// loop starts a client in the cgroup on central that requests every agent
// over and over for d, checking every answer.
func (w *world) loop(d time.Duration) *netsim.Proc {
	self, _ := os.Executable()
	var targets []string
	for host := range agents {
		targets = append(targets, w.target(host)+"="+host)
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
			out, err := w.curl(true, "http://"+w.target(host)+"/")
			if err != nil || out != host {
				t.Fatalf("curl %s from the client cgroup: %v %q", w.target(host), err, out)
			}
			if out, err := w.curl(false, "http://"+w.target(host)+"/"); err == nil {
				t.Fatalf("curl outside the cgroup must fail (central cannot reach vpc hosts), got %q", out)
			}
		}
		out, err := w.n.Run("a1", "curl", "-sS", "--max-time", "2", "http://"+w.target("b1")+"/")
		if err == nil {
			t.Fatalf("vpc-a reached vpc-b: %s", out)
		}
	})

	t.Run("each agent's two tunnels sit on distinct PS nodes", func(t *testing.T) {
		for host := range agents {
			r, err := w.route(w.target(host))
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
		out, _ := w.n.Run("a1", "bash", "-c", "exec 3<>/dev/tcp/198.18.0.10/7000; head -c 4096 /dev/urandom >&3; timeout 2 cat <&3 >/dev/null; true")
		_ = out
		// A wrong token.
		bad := filepath.Join(w.dir, "bad-token")
		_ = os.WriteFile(bad, []byte("not-the-token\n"), 0o600)
		wrong := w.start("agent-wrong-token", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "intruder1", "--ip", "198.18.1.11",
			"--expose", "8081", "--server", "198.18.0.10:7000", "--token-file", bad, "--tunnels", "1")
		// A claim on another agent's IP and port.
		claim := w.start("agent-claim", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "intruder2", "--ip", w.n.Hosts["a2"].IP.String(),
			"--expose", fmt.Sprint(agentPort), "--server", "198.18.0.10:7000", "--token-file", filepath.Join(w.dir, "agent-token"), "--tunnels", "1")
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
		r, err := w.route(w.target("a2"))
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
			ip := w.n.Hosts[host].IP.String()
			count := []int{70, 70, 60}[i]
			for p := range count {
				port := 9000 + p
				args = append(args, "--expose", fmt.Sprintf("%d=%s:%d", port, ip, agentPort))
				all = append(all, fmt.Sprintf("%s:%d=%s", ip, port, host))
			}
			base := []string{"agent", "--id", host + "-bulk", "--ip", ip, "--token-file", filepath.Join(w.dir, "agent-token")}
			for _, s := range agents[host] {
				base = append(base, "--server", s)
			}
			w.start("agent-"+host+"-bulk", host, netsim.StartOpts{}, tetherBin, append(base, args...)...)
		}
		testutil.Eventually(t, 30*time.Second, "200 routes registered", func() error {
			out, err := w.n.Run("central", tetherBin, "routes", "list", "--redis", redisURL, "-o", "json")
			if err != nil {
				return err
			}
			var rs []routeJSON
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
		ps1 := w.procs["ps1"]
		_ = ps1.Signal(syscall.SIGTERM)
		if err := ps1.Wait(20 * time.Second); err != nil {
			t.Fatalf("ps1 did not finish draining: %v", err)
		}
		s := w.loopResult(loop)
		t.Logf("FIGURE ps_drain_failed_requests=%d ok=%d", s.Failed, s.OK)
		if s.Failed != 0 || s.Wrong != 0 {
			t.Fatalf("requests failed during a drain: %+v", s)
		}
		w.startPS("ps1")
		for host := range agents {
			w.waitBackends(w.target(host), 2)
		}
	})

	t.Run("kill -9 of a PS costs seconds and misroutes nothing", func(t *testing.T) {
		loop := w.loop(10 * time.Second)
		time.Sleep(time.Second)
		w.procs["ps2"].Stop() // SIGKILL
		killed := time.Now()
		s := w.loopResult(loop)
		t.Logf("FIGURE ps_kill_longest_failure_window=%v failure_span=%v failed=%d ok=%d", time.Duration(s.LongestFailureMS)*time.Millisecond, time.Duration(s.FailureSpanMS)*time.Millisecond, s.Failed, s.OK)
		if s.Wrong != 0 {
			t.Fatalf("a response came from the wrong host: %+v", s)
		}
		if s.OK == 0 || s.LongestFailureMS > 8000 {
			t.Fatalf("traffic did not recover after the kill: %+v", s)
		}
		w.startPS("ps2")
		for host := range agents {
			w.waitBackends(w.target(host), 2)
		}
		t.Logf("FIGURE ps_kill_time_to_two_backends=%v", time.Since(killed).Round(100*time.Millisecond))
	})

	t.Run("Redis, redirector and agent restarts resume by themselves", func(t *testing.T) {
		// Redirector: killed and restarted under load — zero failures.
		loop := w.loop(5 * time.Second)
		time.Sleep(time.Second)
		w.procs["redirector"].Stop()
		w.startRedirector()
		w.waitRedirector(len(agents))
		s := w.loopResult(loop)
		t.Logf("FIGURE redirector_restart_failed_requests=%d ok=%d", s.Failed, s.OK)
		if s.Failed != 0 || s.Wrong != 0 {
			t.Fatalf("a redirector restart must fail nothing: %+v", s)
		}

		// Redis: stopped and started again with the same data.
		loop = w.loop(8 * time.Second)
		time.Sleep(time.Second)
		redis := w.procs["redis"]
		_ = redis.Signal(syscall.SIGTERM)
		_ = redis.Wait(10 * time.Second)
		w.startRedis()
		s = w.loopResult(loop)
		t.Logf("FIGURE redis_restart_longest_failure_window=%v failure_span=%v failed=%d ok=%d", time.Duration(s.LongestFailureMS)*time.Millisecond, time.Duration(s.FailureSpanMS)*time.Millisecond, s.Failed, s.OK)
		if s.Wrong != 0 || s.OK == 0 {
			t.Fatalf("after a Redis restart: %+v", s)
		}
		for host := range agents {
			w.waitBackends(w.target(host), 2)
		}

		// Agent: killed and started again.
		loop = w.loop(8 * time.Second)
		time.Sleep(time.Second)
		w.procs["agent-a1"].Stop()
		w.startAgent("a1")
		s = w.loopResult(loop)
		t.Logf("FIGURE agent_restart_longest_failure_window=%v failure_span=%v failed=%d ok=%d", time.Duration(s.LongestFailureMS)*time.Millisecond, time.Duration(s.FailureSpanMS)*time.Millisecond, s.Failed, s.OK)
		if s.Wrong != 0 || s.OK == 0 {
			t.Fatalf("after an agent restart: %+v", s)
		}
		w.waitBackends(w.target("a1"), 2)
		if out, err := w.curl(true, "http://"+w.target("a1")+"/"); err != nil || out != "a1" {
			t.Fatalf("a1 after its restart: %v %q", err, out)
		}
	})

	t.Run("uninstall leaves no pins or attachments", func(t *testing.T) {
		w.procs["redirector"].Stop()
		out, err := exec.Command(tetherBin, "redirector", "uninstall", "--cgroup", w.cg.Path, "--pin-dir", w.pinDir).CombinedOutput()
		if err != nil {
			t.Fatalf("uninstall: %v %s", err, out)
		}
		if _, err := redirector.ReadStatus(w.pinDir); err == nil {
			t.Fatal("pins still readable after uninstall")
		}
		if out, err := w.curl(true, "http://"+w.target("a1")+"/"); err == nil {
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

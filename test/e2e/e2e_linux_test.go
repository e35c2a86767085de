// Package e2e proves tether the way its users meet it: a simulated company
// network (test/netsim) with two VPCs, a PS pool behind a VIP, agents on the
// hosts, and a client on the central host reaching each agent by its own IP
// through the eBPF redirector — under failure too.
package e2e

import (
	"context"
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
	if addr := os.Getenv(echoEnv); addr != "" {
		os.Exit(echoMain(addr))
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
	w := &world{System: sys, cg: cg}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, n)
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

// must returns the process, or fails t: must(t)(w.StartPS("ps1")).
func must(t *testing.T) func(*netsim.Proc, error) *netsim.Proc {
	return func(p *netsim.Proc, err error) *netsim.Proc {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
}

func (w *world) start(t *testing.T, name, host string, opts netsim.StartOpts, bin string, args ...string) *netsim.Proc {
	t.Helper()
	p := must(t)(w.N.Start(name, host, opts, bin, args...))
	w.Procs[name] = p
	return p
}

func (w *world) waitBackends(t *testing.T, target string, n int) {
	t.Helper()
	if _, err := w.WaitBackends(t.Context(), target, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// agentWindow bounds the failures of an agent killed with -9 and started
// again: it republishes within its backoff (at most 1 s); a request started
// before that may take the whole request timeout. Wide margin for a loaded
// 2-core machine.
const agentWindow = time.Second + requestTimeout + 3*time.Second

// TestCompanyNetwork runs the scenarios on one shared topology, in order:
// each leaves the system as the next expects it.
func TestCompanyNetwork(t *testing.T) {
	w := newWorld(t)
	for _, s := range []struct {
		name string
		run  func(*testing.T, *world)
	}{
		{"the client in the cgroup reaches every agent by its own IP, nothing else changes", reachAgentsByOwnIP},
		{"each agent's two tunnels sit on distinct PS nodes", tunnelsOnDistinctPS},
		{"the intent in redirected SYNs crosses the core router and is verified by the PS", intentCrossesTheNetwork},
		{"bad input on the wire is refused and the others keep working", badInputIsRefused},
		{"200 exposed endpoints across the agents are all reachable", manyEndpoints},
		{"a PS drain (SIGTERM) fails no request", psDrain},
		{"a PS on the per-port listener data plane serves beside one on sk_lookup, and the switch fails no request", listenerPlane},
		{"kill -9 of a PS costs milliseconds and misroutes nothing", psKill},
		{"a PS that vanishes silently costs about a second; its 1,000 client sockets are destroyed", psSilentDeath},
		{"a redirector restart fails nothing and the new process syncs new routes", redirectorRestart},
		{"a one-minute Redis outage fails nothing; the readers log it and its end", redisOutageScenario},
		{"FLUSHALL of Redis fails nothing and the writers make the registry whole again", redisFlushall},
		{"an agent restart fails only its own requests, briefly", agentRestart},
		{"a rolling agent restart (new process, then SIGTERM to the old) fails nothing", agentRollingRestart},
		{"the redirector exits 0 on SIGTERM and uninstall leaves no pins or attachments", uninstall},
	} {
		if !selected(s.name) {
			t.Logf("skipping %q: not in $%s", s.name, scenariosEnv)
			continue
		}
		if !t.Run(s.name, func(t *testing.T) { s.run(t, w) }) {
			t.Fatalf("stopped after %q failed: the later scenarios share its topology", s.name)
		}
	}
}

// scenariosEnv, when set, runs only the scenarios whose name contains one
// of its comma-separated parts (for working on one scenario; CI runs all).
const scenariosEnv = "TETHER_E2E_SCENARIOS"

func selected(name string) bool {
	only := os.Getenv(scenariosEnv)
	if only == "" {
		return true
	}
	for _, part := range strings.Split(only, ",") {
		if part != "" && strings.Contains(name, part) {
			return true
		}
	}
	return false
}

// dumpLogs, after a failure, asks every process still running to print
// its goroutines (Go daemons do on SIGQUIT), then writes every process's
// whole log under the system's temporary directory and the tail of each
// into the test log.
func dumpLogs(t *testing.T, n *netsim.Network) {
	dir, err := os.MkdirTemp("", "tether-e2e-logs-")
	if err != nil {
		t.Log(err)
	}
	for _, p := range n.Procs() {
		if !p.Exited() && (strings.HasPrefix(p.Name, "agent") || p.Name == "ps1" || p.Name == "ps2") {
			_ = p.Signal(syscall.SIGQUIT)
		}
	}
	time.Sleep(500 * time.Millisecond)
	for i, p := range n.Procs() {
		t.Logf("---- log of %s ----\n%s", p.Name, tail(p.Log(), 4000))
		if dir != "" {
			_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%02d-%s.log", i, p.Name)), []byte(p.Log()), 0o644)
		}
	}
	if dir != "" {
		t.Logf("every process's whole log is in %s", dir)
	}
}

func reachAgentsByOwnIP(t *testing.T, w *world) {
	for host := range agents {
		out, err := w.Curl(true, "http://"+w.Target(host)+"/")
		if err != nil || out != host {
			t.Fatalf("curl %s from the client cgroup: %v %q", w.Target(host), err, out)
		}
		if out, err := w.Curl(false, "http://"+w.Target(host)+"/"); err == nil {
			t.Fatalf("curl outside the cgroup must fail (central cannot reach vpc hosts), got %q", out)
		}
	}
	out, err := w.N.Run("a1", "curl", "-sS", "--max-time", "2", "http://"+w.Target("b1")+"/")
	if err == nil {
		t.Fatalf("vpc-a reached vpc-b: %s", out)
	}
}

func tunnelsOnDistinctPS(t *testing.T, w *world) {
	for host := range agents {
		r, err := w.Route(w.Target(host))
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
}

// intentCrossesTheNetwork: the option the client host's sockops program
// writes into redirected SYNs crosses the core router and the PS subnet's
// bridge intact, and the PS verifies it: every request counts as a match.
func intentCrossesTheNetwork(t *testing.T, w *world) {
	before := w.intentCounts(t)
	const n = 10
	for i := 0; i < n; i++ {
		for host := range agents {
			if out, err := w.Curl(true, "http://"+w.Target(host)+"/"); err != nil || out != host {
				t.Fatalf("curl %s from the client cgroup: %v %q", w.Target(host), err, out)
			}
		}
	}
	after := w.intentCounts(t)
	t.Logf("intent checks on the PS nodes: before %v, after %v", before, after)
	if got := after["match"] - before["match"]; got < float64(n*len(agents)) {
		t.Fatalf("%v intent matches for %d redirected requests: the option did not arrive", got, n*len(agents))
	}
	if after["mismatch"] != before["mismatch"] || after["absent"] != before["absent"] {
		t.Fatalf("intent mismatches or absences on redirected requests: before %v, after %v", before, after)
	}
}

// intentCounts sums tether_ps_intent_total by result over the PS nodes,
// read from each node's /metrics inside its namespace.
func (w *world) intentCounts(t *testing.T) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, ps := range []string{"ps1", "ps2"} {
		url := fmt.Sprintf("http://%s:%d/metrics", w.N.Hosts[ps].IP, netsim.PSMetricsPort)
		body, err := w.N.Run(ps, "curl", "-sS", "--max-time", "5", url)
		if err != nil {
			t.Fatalf("metrics of %s: %v %s", ps, err, body)
		}
		for _, line := range strings.Split(string(body), "\n") {
			var result string
			var v float64
			if _, err := fmt.Sscanf(line, "tether_ps_intent_total{result=%q} %g", &result, &v); err == nil {
				out[result] += v
			}
		}
	}
	return out
}

func badInputIsRefused(t *testing.T, w *world) {
	loop := w.startLoop(t)
	at := time.Now()
	// Garbage to the VIP's tunnel port; whatever the PS answers is drained
	// for at most 2 s.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, _ = w.N.RunContext(ctx, "a1", "bash", "-c", "exec 3<>/dev/tcp/198.18.0.10/7000; head -c 4096 /dev/urandom >&3; timeout 2 cat <&3 >/dev/null; true")
	// A wrong token.
	bad := filepath.Join(t.TempDir(), "bad-token")
	_ = os.WriteFile(bad, []byte("not-the-token\n"), 0o600)
	wrong := w.start(t, "agent-wrong-token", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "intruder1", "--ip", "198.18.1.11",
		"--expose", "8081", "--server", "198.18.0.10:7000", "--token-file", bad, "--tunnels", "1")
	// A claim on another agent's IP and port.
	claim := w.start(t, "agent-claim", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "intruder2", "--ip", w.N.Hosts["a2"].IP.String(),
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
	r, err := w.Route(w.Target("a2"))
	if err != nil || len(r.Backends) != 2 || r.Backends[0].AgentID != "a2" || r.Backends[1].AgentID != "a2" {
		t.Fatalf("a2's route changed hands: %+v %v", r, err)
	}
	loop.waitOK(t, time.Now(), "after the bad input")
	run := loop.stop(t)
	t.Logf("during bad input: %s", run.summary(at))
	disturbance{what: "bad input from other agents", at: at}.check(t, run, loop.targets)
}

func manyEndpoints(t *testing.T, w *world) {
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
		w.start(t, "agent-"+host+"-bulk", host, netsim.StartOpts{}, tetherBin, append(base, args...)...)
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
	p := w.start(t, "client-scale", "central", netsim.StartOpts{Cgroup: w.cg.Path, Env: []string{clientEnv + "=each"}},
		self, "-test.run=^$", strings.Join(all, ","))
	if err := p.Wait(time.Minute); err != nil {
		t.Fatalf("scale client: %v\n%s", err, tail(p.Log(), 3000))
	}
	if !strings.Contains(p.Log(), "ok=200 failed=0") {
		t.Fatalf("not all 200 endpoints reachable:\n%s", tail(p.Log(), 3000))
	}
}

func psDrain(t *testing.T, w *world) {
	loop := w.startLoop(t)
	ps1 := w.Procs["ps1"]
	at := time.Now()
	_ = ps1.Signal(syscall.SIGTERM)
	if err := ps1.Wait(20 * time.Second); err != nil {
		t.Fatalf("ps1 did not finish draining: %v", err)
	}
	loop.waitOK(t, time.Now(), "after the drain")
	run := loop.stop(t)
	t.Logf("FIGURE ps_drain_failed_requests=%d ok=%d", len(run.with(resultFailed)), len(run.with(resultOK)))
	disturbance{what: "a PS drain", at: at}.check(t, run, loop.targets)
	must(t)(w.StartPS("ps1"))
	for host := range agents {
		w.waitBackends(t, w.Target(host), 2)
	}
}

// psMetric reads one sample of a PS node's /metrics inside its namespace
// (line is the series as exported, labels included).
func (w *world) psMetric(t *testing.T, ps, series string) float64 {
	t.Helper()
	url := fmt.Sprintf("http://%s:%d/metrics", w.N.Hosts[ps].IP, netsim.PSMetricsPort)
	body, err := w.N.Run(ps, "curl", "-sS", "--max-time", "5", url)
	if err != nil {
		t.Fatalf("metrics of %s: %v %s", ps, err, body)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			if _, err := fmt.Sscanf(rest, "%g", &v); err == nil {
				return v
			}
		}
	}
	t.Fatalf("%s exports no %s", ps, series)
	return 0
}

// restartPS drains a PS node (SIGTERM) and starts it again on the given
// data plane, then waits until every agent has both backends again.
func (w *world) restartPS(t *testing.T, name, plane string) {
	t.Helper()
	p := w.Procs[name]
	_ = p.Signal(syscall.SIGTERM)
	if err := p.Wait(20 * time.Second); err != nil {
		t.Fatalf("%s did not finish draining: %v", name, err)
	}
	w.DataPlanes[name] = plane
	must(t)(w.StartPS(name))
	for host := range agents {
		w.waitBackends(t, w.Target(host), 2)
	}
}

// listenerPlane runs the pool mixed: ps1 on the per-port listeners (the
// fallback for hosts where sk_lookup cannot load), ps2 on sk_lookup (the
// default of every other scenario). Both switches, ps1 to listeners and
// back, are drains under a client loop and fail nothing; while mixed,
// every agent answers through both nodes.
func listenerPlane(t *testing.T, w *world) {
	const sk, ls = `tether_ps_data_plane{plane="sk_lookup"}`, `tether_ps_data_plane{plane="listeners"}`
	for _, ps := range []string{"ps1", "ps2"} {
		if w.psMetric(t, ps, sk) != 1 {
			t.Fatalf("%s does not run the sk_lookup data plane by default", ps)
		}
	}
	loop := w.startLoop(t)
	at := time.Now()
	w.restartPS(t, "ps1", "listeners")
	if w.psMetric(t, "ps1", ls) != 1 || w.psMetric(t, "ps2", sk) != 1 {
		t.Fatal("after the restart ps1 should run the listeners plane and ps2 sk_lookup")
	}
	if !strings.Contains(w.Procs["ps1"].Log(), "data_plane=listeners") {
		t.Fatalf("ps1 does not log its data plane:\n%s", tail(w.Procs["ps1"].Log(), 2000))
	}
	// Each node answers for every agent: dial its backends directly from
	// central (outside the client cgroup, so nothing is redirected).
	routes, err := w.routes()
	if err != nil {
		t.Fatal(err)
	}
	served := map[string]int{}
	for _, r := range routes {
		host, ok := agentOf(w, r.Target)
		if !ok {
			continue
		}
		for _, b := range r.Backends {
			out, err := w.Curl(false, "http://"+b.Address+"/")
			if err != nil || out != host {
				t.Fatalf("%s via %s (%s): %q, %v; want %q", r.Target, b.Address, b.PSID, out, err, host)
			}
			served[b.PSID]++
		}
	}
	if served["ps1"] == 0 || served["ps2"] == 0 {
		t.Fatalf("backends answered per node %v: want both nodes", served)
	}
	w.restartPS(t, "ps1", "")
	loop.waitOK(t, time.Now(), "after ps1 is back on sk_lookup")
	run := loop.stop(t)
	t.Logf("FIGURE plane_switch_failed_requests=%d ok=%d served_directly=%v", len(run.with(resultFailed)), len(run.with(resultOK)), served)
	disturbance{what: "two PS drains switching the data plane", at: at}.check(t, run, loop.targets)
	if w.psMetric(t, "ps1", sk) != 1 {
		t.Fatal("ps1 is not back on sk_lookup")
	}
}

// agentOf names the agent host whose service target is, if any.
func agentOf(w *world, target string) (string, bool) {
	for host := range agents {
		if w.Target(host) == target {
			return host, true
		}
	}
	return "", false
}

// redirectorRestart kills the redirector under load and starts a new one:
// the pinned links keep redirecting without any process, so zero failures
// alone would not show that the new process works; a route published after
// the restart must become reachable, which only a live, syncing redirector
// can make happen.
func redirectorRestart(t *testing.T, w *world) {
	loop := w.startLoop(t)
	at := time.Now()
	w.Procs["redirector"].Stop() // SIGKILL
	red := must(t)(w.StartRedirector())
	ip := w.N.Hosts["a1"].IP.String()
	late := w.start(t, "agent-a1-late", "a1", netsim.StartOpts{}, tetherBin, "agent", "--id", "a1-late", "--ip", ip,
		"--expose", fmt.Sprintf("9300=%s:%d", ip, netsim.AgentPort), "--server", agents["a1"][0], "--token-file", w.AgentTokenFile())
	defer late.Stop()
	newURL := "http://" + ip + ":9300/"
	testutil.Eventually(t, 30*time.Second, "a route published after the restart reachable through the redirect", func() error {
		if red.Exited() {
			return fmt.Errorf("the new redirector exited: %v\n%s", red.Wait(time.Second), tail(red.Log(), 2000))
		}
		if out, err := w.Curl(true, newURL); err != nil || out != "a1" {
			return fmt.Errorf("curl %s: %v %q", newURL, err, out)
		}
		return nil
	})
	t.Logf("FIGURE redirector_restart_to_new_route_reachable=%v", time.Since(at).Round(100*time.Millisecond))
	loop.waitOK(t, time.Now(), "after the redirector restart")
	run := loop.stop(t)
	t.Logf("FIGURE redirector_restart_failed_requests=%d ok=%d", len(run.with(resultFailed)), len(run.with(resultOK)))
	disturbance{what: "a redirector restart", at: at}.check(t, run, loop.targets)
	if red.Exited() {
		t.Fatalf("the new redirector exited: %v\n%s", red.Wait(time.Second), tail(red.Log(), 2000))
	}
}

func agentRestart(t *testing.T, w *world) {
	loop := w.startLoop(t)
	at := time.Now()
	w.Procs["agent-a1"].Stop() // SIGKILL
	must(t)(w.StartAgent("a1"))
	loop.waitOK(t, at.Add(agentWindow), "after the agent restart")
	run := loop.stop(t)
	failed := run.with(resultFailed)
	var last time.Duration
	if len(failed) > 0 {
		last = failed[len(failed)-1].end().Sub(at)
	}
	t.Logf("FIGURE agent_restart_failed_requests=%d last_failure_after_kill=%v ok=%d", len(failed), last.Round(time.Millisecond), len(run.with(resultOK)))
	for _, s := range failed {
		t.Logf("  %s failed %v after the kill, in %v: %s", s.Target, s.end().Sub(at).Round(time.Millisecond), s.end().Sub(s.start()).Round(time.Millisecond), s.Detail)
	}
	disturbance{what: "a restart of agent a1", at: at, window: agentWindow, only: w.Target("a1")}.check(t, run, loop.targets)
	w.waitBackends(t, w.Target("a1"), 2)
	if out, err := w.Curl(true, "http://"+w.Target("a1")+"/"); err != nil || out != "a1" {
		t.Fatalf("a1 after its restart: %v %q", err, out)
	}
}

func uninstall(t *testing.T, w *world) {
	red := w.Procs["redirector"]
	if red.Exited() {
		t.Fatalf("the redirector is not running: %v\n%s", red.Wait(time.Second), tail(red.Log(), 2000))
	}
	_ = red.Signal(syscall.SIGTERM)
	if err := red.Wait(10 * time.Second); err != nil {
		t.Fatalf("the redirector must exit 0 on SIGTERM: %v\n%s", err, tail(red.Log(), 2000))
	}
	out, err := exec.Command(tetherBin, "redirector", "uninstall", "--cgroup", w.Cgroup, "--pin-dir", w.PinDir).CombinedOutput()
	if err != nil {
		t.Fatalf("uninstall: %v %s", err, out)
	}
	if _, err := redirector.ReadStatus(w.PinDir); err == nil {
		t.Fatal("pins still readable after uninstall")
	}
	// Uninstall detaches the links before it returns (not when the kernel
	// gets round to freeing them), so the very next connect is plain.
	if out, err := w.Curl(true, "http://"+w.Target("a1")+"/"); err == nil {
		t.Fatalf("still redirected right after uninstall: %s", out)
	}
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

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
)

func TestPSAndAgentHelp(t *testing.T) {
	for cmd, flags := range map[string][]string{
		"ps":    {"--listen", "--advertise", "--ports", "--redis", "--id", "--token-file", "--allow-clients", "--agent-cidrs", "--metrics", "--tls-cert", "--tls-key", "--tls-ca", "--lease", "--quarantine", "--drain-timeout"},
		"agent": {"--server", "--id", "--ip", "--expose", "--tunnels", "--token-file", "--metrics", "--tls-cert", "--tls-key", "--tls-ca"},
	} {
		out, err := runTether(t, cmd, "--help")
		if err != nil {
			t.Fatalf("%s --help: %v", cmd, err)
		}
		for _, f := range flags {
			if !strings.Contains(out, f) {
				t.Errorf("%s --help does not mention %s", cmd, f)
			}
		}
	}
}

func TestPSAndAgentRejectBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"ps", "--id", "ps1", "--redis", "redis://127.0.0.1:1/0"}, "--advertise"},
		{[]string{"ps", "--id", "ps1", "--advertise", "127.0.0.1", "--ports", "30-20"}, "--ports"},
		{[]string{"ps", "--id", "p s", "--advertise", "127.0.0.1"}, "--id"},
		{[]string{"ps", "--id", "ps1", "--advertise", "127.0.0.1", "--allow-clients", "10.0.0.0/33"}, "--allow-clients"},
		{[]string{"agent", "--server", "127.0.0.1:7000", "--id", "a1"}, "--expose"},
		{[]string{"agent", "--server", "127.0.0.1:7000", "--id", "a1", "--expose", "80=nohostport"}, "not HOST:PORT"},
		{[]string{"agent", "--id", "a1", "--expose", "80"}, "--server is required"},
		// A bad registry address is refused before anything starts (the
		// redirector would otherwise attach its programs first).
		{[]string{"ps", "--id", "ps1", "--advertise", "127.0.0.1", "--redis", "http://127.0.0.1:6379"}, "--redis"},
		{[]string{"redirector", "--cgroup", "/sys/fs/cgroup/unified/tether-no-such-cgroup", "--redis", "http://127.0.0.1:6379"}, "--redis"},
		{[]string{"proxy", "--socks", "127.0.0.1:0", "--redis", "http://127.0.0.1:6379"}, "--redis"},
	}
	for _, c := range cases {
		out, err := runTether(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("tether %s: got %v (%s), want an error naming %s", strings.Join(c.args, " "), err, out, c.want)
		}
	}
}

// tetherBin builds the tether binary for one test (the build cache makes
// the second build cheap), in the test's temporary directory.
func tetherBin(t *testing.T) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	if p, ok := bins[t]; ok {
		return p
	}
	p := filepath.Join(t.TempDir(), "tether")
	out, err := exec.Command("go", "build", "-o", p, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	bins[t] = p
	t.Cleanup(func() { binMu.Lock(); delete(bins, t); binMu.Unlock() })
	return p
}

var (
	binMu sync.Mutex
	bins  = map[*testing.T]string{}
)

// proc is a tether process started by a test.
type proc struct{ *testutil.Proc }

func startProc(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	var env []string
	if len(args) > 0 && args[0] == "agent" {
		// Agents present the test token, as the test PS nodes require.
		env = []string{cliconfig.TokenEnv + "=" + tunneltest.Token}
	}
	return &proc{testutil.StartProc(t, name, env, tetherBin(t), append([]string{"--log-level", "debug"}, args...)...)}
}

// stop sends SIGTERM (a drain) and waits for the exit.
func (p *proc) stop() { p.Stop() }

// kill9 ends the process as a crash would.
func (p *proc) kill9() { p.Kill() }

type psProc struct {
	*proc
	listen string
	args   []string
}

func startPSProc(t *testing.T, redisURL, id string, extra ...string) *psProc {
	listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	args := append([]string{"ps", "--id", id, "--listen", listen, "--advertise", "127.0.0.1",
		"--ports", tunneltest.FreeRange(t, 20), "--redis", redisURL, "--lease", "2s", "--renew", "500ms",
		"--drain-timeout", "2s", "--token-file", tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n"),
		"--agent-cidrs", tunneltest.AgentRange}, extra...)
	p := &psProc{proc: startProc(t, "ps "+id, args...), listen: listen, args: args}
	testutil.WaitTCP(t, listen, 10*time.Second)
	return p
}

func (p *psProc) restart(t *testing.T) {
	p.proc = startProc(t, p.Name, p.args...)
	testutil.WaitTCP(t, p.listen, 10*time.Second)
}

func backendsOf(t *testing.T, reg *registry.Registry, target netip.AddrPort) map[string]registry.Backend {
	rt, err := reg.Get(context.Background(), target)
	if errors.Is(err, registry.ErrNotFound) {
		return nil
	}
	if err != nil {
		t.Logf("get %s: %v", target, err)
		return nil
	}
	out := map[string]registry.Backend{}
	for _, b := range rt.Backends {
		out[b.PSID] = b
	}
	return out
}

func waitPS(t *testing.T, reg *registry.Registry, target netip.AddrPort, ids ...string) map[string]registry.Backend {
	t.Helper()
	var got map[string]registry.Backend
	testutil.Eventually(t, 20*time.Second, fmt.Sprintf("%s served by exactly %v", target, ids), func() error {
		got = backendsOf(t, reg, target)
		if len(got) != len(ids) {
			return fmt.Errorf("backends %v", got)
		}
		for _, id := range ids {
			if _, ok := got[id]; !ok {
				return fmt.Errorf("backends %v", got)
			}
		}
		return nil
	})
	return got
}

func askVia(t *testing.T, b registry.Backend, want string) {
	t.Helper()
	got, err := tunneltest.Ask(b.Address.String())
	if err != nil || got != want {
		t.Fatalf("via %s (%s): got %q, %v; want %q", b.PSID, b.Address, got, err, want)
	}
}

// kill -9 of one PS: its backend lapses with its lease, traffic through
// the other PS keeps working, and once the PS is back the agent holds two
// tunnels again.
func TestKill9OfAPSCostsOneLease(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	ps1 := startPSProc(t, rd.URL(), "ps1")
	ps2 := startPSProc(t, rd.URL(), "ps2")
	srv := tunneltest.IdentityServer(t, "agent-a1")
	startProc(t, "agent a1", "agent", "--server", ps1.listen, "--server", ps2.listen, "--id", "a1",
		"--ip", "127.77.0.1", "--expose", "9100="+srv, "--backoff-min", "100ms", "--backoff-max", "1s")
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	both := waitPS(t, reg, target, "ps1", "ps2")
	askVia(t, both["ps1"], "agent-a1")
	askVia(t, both["ps2"], "agent-a1")

	lastSeen := both["ps1"]
	ps1.kill9()
	killed := time.Now()
	testutil.Eventually(t, 20*time.Second, "the dead PS's backend disappears", func() error {
		got := backendsOf(t, reg, target)
		if b, ok := got["ps1"]; ok {
			lastSeen = b
			return fmt.Errorf("ps1 still listed, lease until %v", b.ExpiresAt)
		}
		if _, ok := got["ps2"]; !ok {
			return fmt.Errorf("ps2 missing too: %v", got)
		}
		return nil
	})
	// Logical, not timing: no lease handed out by the dead PS outlived it
	// by more than one lease (2 s), so readers stop using it by then.
	if limit := killed.Add(2 * time.Second); lastSeen.ExpiresAt.After(limit.Add(50 * time.Millisecond)) {
		t.Fatalf("the dead PS's backend was valid until %v, more than one lease after the kill at %v", lastSeen.ExpiresAt, killed)
	}
	askVia(t, both["ps2"], "agent-a1")

	ps1.restart(t)
	back := waitPS(t, reg, target, "ps1", "ps2")
	askVia(t, back["ps1"], "agent-a1")
	askVia(t, back["ps2"], "agent-a1")
}

// A Redis restart (same data directory) and an agent restart: the routes
// come back by themselves.
func TestRoutesComeBackAfterRedisAndAgentRestarts(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	ps1 := startPSProc(t, rd.URL(), "ps1", "--resync", "1s")
	ps2 := startPSProc(t, rd.URL(), "ps2", "--resync", "1s")
	srv := tunneltest.IdentityServer(t, "agent-a1")
	agentArgs := []string{"agent", "--server", ps1.listen, "--server", ps2.listen, "--id", "a1",
		"--ip", "127.77.0.1", "--expose", "9100=" + srv, "--backoff-min", "100ms", "--backoff-max", "1s"}
	ag := startProc(t, "agent a1", agentArgs...)
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	waitPS(t, reg, target, "ps1", "ps2")

	rd.Stop()
	// An outage longer than the 2 s lease: every lease lapses meanwhile.
	// (This models the outage's length; nothing waits on it for readiness.)
	time.Sleep(3 * time.Second)
	rd.Start()
	got := waitPS(t, reg, target, "ps1", "ps2")
	askVia(t, got["ps1"], "agent-a1")
	askVia(t, got["ps2"], "agent-a1")

	// A crash and a restart of Redis that loses its data: the PS nodes
	// publish their routes again. A marker lease no PS would write again
	// shows that the data really went: without it, routes that merely
	// survived the restart would pass for recovered ones.
	ctx := context.Background()
	marker := registry.PSLease{ID: "marker", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: time.Now().Add(time.Hour)}
	if err := reg.RenewPS(ctx, marker); err != nil {
		t.Fatal(err)
	}
	if leases, err := reg.PSLeases(ctx); err != nil || leases["marker"].ID != "marker" {
		t.Fatalf("marker lease not stored: %v, %v", leases, err)
	}
	// Whatever files this Redis persists to, as it names them itself: the
	// AOF directory (Redis >= 7), the single AOF file (older), the RDB file.
	files := redisDataFiles(t, rd.Addr())
	rd.Kill()
	removed := 0
	for _, f := range files {
		if _, err := os.Lstat(f); err != nil {
			continue
		}
		if err := os.RemoveAll(f); err != nil {
			t.Fatal(err)
		}
		removed++
	}
	if removed == 0 {
		t.Fatalf("none of the persistence files %q existed: the data-loss case tests nothing", files)
	}
	rd.Start()
	if leases, err := reg.PSLeases(ctx); err != nil || leases["marker"].ID != "" {
		t.Fatalf("after deleting %q Redis still has the marker lease (%v, %v): no data was lost", files, leases["marker"], err)
	}
	got = waitPS(t, reg, target, "ps1", "ps2")
	askVia(t, got["ps1"], "agent-a1")

	old := got
	ag.kill9()
	startProc(t, "agent a1 again", agentArgs...)
	// The restarted agent's routes use fresh ports: the old ones are
	// quarantined when its dead tunnels are released.
	testutil.Eventually(t, 20*time.Second, "routes of the restarted agent", func() error {
		got = backendsOf(t, reg, target)
		for _, id := range []string{"ps1", "ps2"} {
			b, ok := got[id]
			if !ok || b.Address == old[id].Address {
				return fmt.Errorf("backends %v", got)
			}
		}
		return nil
	})
	askVia(t, got["ps1"], "agent-a1")
	askVia(t, got["ps2"], "agent-a1")
}

// redisDataFiles asks the Redis at addr where it persists its data and
// returns those paths: dir joined with dbfilename, appendfilename and, on
// Redis >= 7, appenddirname (older servers return nothing for it).
func redisDataFiles(t *testing.T, addr string) []string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	get := func(name string) string {
		if _, err := fmt.Fprintf(c, "*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", len(name), name); err != nil {
			t.Fatal(err)
		}
		// The answer is an array: empty, or the name and its value.
		head, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("CONFIG GET %s: %v", name, err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(head, "*")))
		if err != nil || !strings.HasPrefix(head, "*") {
			t.Fatalf("CONFIG GET %s answered %q", name, head)
		}
		var vals []string
		for range n {
			if _, err := r.ReadString('\n'); err != nil { // $len
				t.Fatalf("CONFIG GET %s: %v", name, err)
			}
			v, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("CONFIG GET %s: %v", name, err)
			}
			vals = append(vals, strings.TrimRight(v, "\r\n"))
		}
		if len(vals) != 2 {
			return ""
		}
		return vals[1]
	}
	dir := get("dir")
	if dir == "" {
		t.Fatal("CONFIG GET dir answered nothing")
	}
	var out []string
	for _, name := range []string{"dbfilename", "appendfilename", "appenddirname"} {
		if v := get(name); v != "" {
			out = append(out, filepath.Join(dir, v))
		}
	}
	return out
}

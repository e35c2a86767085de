package main

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// probe GETs path on a daemon's metrics address.
func probe(addr, path string) (int, string, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body)), err
}

// waitProbe waits until path on addr answers code with a body containing
// every one of want.
func waitProbe(t *testing.T, addr, path string, code int, want ...string) string {
	t.Helper()
	var body string
	testutil.Eventually(t, 20*time.Second, fmt.Sprintf("%s%s answers %d %q", addr, path, code, want), func() error {
		got, b, err := probe(addr, path)
		if err != nil {
			return err
		}
		body = b
		if got != code {
			return fmt.Errorf("got %d %q", got, b)
		}
		for _, w := range want {
			if !strings.Contains(b, w) {
				return fmt.Errorf("got %d %q, want %q in it", got, b, w)
			}
		}
		return nil
	})
	return body
}

// assertNotReadyFor checks that /readyz stays 503 (naming why) for a
// while: not a passing glimpse of the start.
func assertNotReadyFor(t *testing.T, addr string, d time.Duration, why string) {
	t.Helper()
	waitProbe(t, addr, "/readyz", http.StatusServiceUnavailable, why)
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		code, body, err := probe(addr, "/readyz")
		if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, why) {
			t.Fatalf("/readyz while %q should hold: %d %q %v", why, code, body, err)
		}
	}
	if code, body, _ := probe(addr, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz of a daemon that is only not ready yet: %d %q", code, body)
	}
}

// countLines counts the lines of out containing s.
func countLines(out, s string) int {
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

// waitLog waits until p has logged a line containing s.
func waitLog(t *testing.T, p *proc, s string) {
	t.Helper()
	testutil.Eventually(t, 15*time.Second, p.Name+" logs "+s, func() error {
		if !strings.Contains(p.Output(), s) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}

// hangUp sends SIGHUP to p, and checks that it is still running a moment
// later (SIGHUP's default action kills a process).
func hangUp(t *testing.T, p *proc) {
	t.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatalf("SIGHUP %s: %v", p.Name, err)
	}
	select {
	case <-p.Done():
		t.Fatalf("%s died of SIGHUP: %v\n%s", p.Name, p.Cmd.ProcessState, p.Output())
	case <-time.After(500 * time.Millisecond):
	}
}

// The PS is not ready before it holds its lease and listens, ready after,
// and not ready again once its lease could not be renewed for a lease.
func TestPSReadiness(t *testing.T) {
	rd := testutil.StartRedis(t)
	rd.Stop()
	metrics := freeAddr(t)
	listen := freeAddr(t)
	p := startProc(t, "ps1", "ps", "--id", "ps1", "--listen", listen, "--advertise", "127.0.0.1",
		"--ports", tunneltest.FreeRange(t, 4), "--redis", rd.URL(), "--lease", "2s", "--renew", "500ms",
		"--drain-timeout", "1s", "--token-file", tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n"),
		"--agent-cidrs", tunneltest.AgentRange, "--metrics", metrics)
	testutil.WaitTCP(t, metrics, 10*time.Second)
	assertNotReadyFor(t, metrics, time.Second, "lease not claimed yet")
	if _, body, _ := probe(metrics, "/readyz"); !strings.Contains(body, "tunnel listener not open yet") {
		t.Fatalf("/readyz before the start: %q, want the listener named too", body)
	}

	rd.Start()
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
	testutil.WaitTCP(t, listen, 5*time.Second)
	waitLog(t, p, "tether ps ready")

	// Redis gone: the lease cannot be renewed, and after one lease the PS
	// says it is not ready (readers may count it dead), while it stays
	// healthy (the renew loop runs, it just fails).
	rd.Stop()
	waitProbe(t, metrics, "/readyz", http.StatusServiceUnavailable, "lease last renewed")
	waitProbe(t, metrics, "/healthz", http.StatusOK, "ok")
	rd.Start()
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
	if n := countLines(p.Output(), "tether ps ready"); n != 1 {
		t.Fatalf("%d \"ready\" log lines, want exactly 1 (the first readiness)\n%s", n, p.Output())
	}
	for _, want := range []string{"starting tether ps", "commit="} {
		if !strings.Contains(p.Output(), want) {
			t.Errorf("the PS log lacks %q", want)
		}
	}
	p.stop()
	if !strings.Contains(p.Output(), "tether ps stopped") {
		t.Errorf("the PS did not log its stop:\n%s", p.Output())
	}
}

// The agent is not ready before a tunnel is up, ready once one is and its
// endpoint was accepted; an agent whose endpoint every PS refuses is not
// ready, naming the endpoint. SIGHUP leaves it running and serving.
func TestAgentReadinessAndSIGHUP(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	// Two endpoints per credential: the second agent below, with the same
	// token, gets one of its two.
	ps1 := startPSProc(t, rd.URL(), "ps1", "--credential-endpoints", "2")
	ps1.stop() // known address, nothing listening: the agent cannot connect yet

	metrics := freeAddr(t)
	srv := tunneltest.IdentityServer(t, "agent-a1")
	a := startProc(t, "agent a1", "agent", "--server", ps1.listen, "--tunnels", "1", "--id", "a1",
		"--ip", "127.77.0.1", "--expose", "9100="+srv, "--backoff-min", "100ms", "--backoff-max", "300ms", "--metrics", metrics)
	testutil.WaitTCP(t, metrics, 10*time.Second)
	assertNotReadyFor(t, metrics, time.Second, "no tunnel up yet")

	ps1.restart(t)
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
	waitLog(t, a, "tether agent ready")
	backend := waitPS(t, reg, netip.MustParseAddrPort("127.77.0.1:9100"), "ps1")["ps1"]

	hangUp(t, a)
	waitLog(t, a, "nothing to reload")
	askVia(t, backend, "agent-a1")
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")

	// Negative: an endpoint the PS refuses (over the credential's quota)
	// while the tunnel is up: the agent is not ready, naming that endpoint
	// and not the accepted one.
	metrics2 := freeAddr(t)
	startProc(t, "agent a2", "agent", "--server", ps1.listen, "--tunnels", "1", "--id", "a2",
		"--ip", "127.77.0.2", "--expose", "9100="+srv, "--expose", "9101="+srv, "--metrics", metrics2)
	testutil.WaitTCP(t, metrics2, 10*time.Second)
	body := waitProbe(t, metrics2, "/readyz", http.StatusServiceUnavailable, "endpoint 127.77.0.2:9101 accepted by no PS", "ps1: quota")
	if strings.Contains(body, "no tunnel up") || strings.Contains(body, "127.77.0.2:9100") {
		t.Fatalf("the tunnel is up and 127.77.0.2:9100 accepted, only :9101 refused: %q", body)
	}
}

// The proxy is not ready before its mirror holds a first load of the
// registry, ready after; SIGHUP leaves it running.
func TestProxyReadiness(t *testing.T) {
	rd := testutil.StartRedis(t)
	rd.Stop()
	metrics, socks := freeAddr(t), freeAddr(t)
	p := startProc(t, "proxy", "proxy", "--redis", rd.URL(), "--socks", socks, "--metrics", metrics)
	testutil.WaitTCP(t, metrics, 10*time.Second)
	assertNotReadyFor(t, metrics, time.Second, "route mirror not loaded yet")
	rd.Start()
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
	waitLog(t, p, "tether proxy ready")
	hangUp(t, p)
	waitLog(t, p, "nothing to reload")
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
}

// The redirector is not ready before the first full load reached the
// kernel map, ready after, and not ready once no sync succeeded for its
// bound (two --resync periods and 10 s); SIGHUP leaves it running.
func TestRedirectorReadiness(t *testing.T) {
	testutil.RequirePrivileged(t) // loads BPF
	rd := testutil.StartRedis(t)
	rd.Stop()
	cg := testutil.NewCgroup(t)
	pinDir := filepath.Join("/sys/fs/bpf", testutil.UniqueName("trdy"))
	t.Cleanup(func() {
		if _, err := os.Stat(pinDir); err != nil {
			return // never installed
		}
		if out, err := runTether(t, "redirector", "uninstall", "--pin-dir", pinDir); err != nil {
			t.Errorf("redirector uninstall: %v\n%s", err, out)
		}
	})
	metrics := freeAddr(t)
	r := startProc(t, "redirector", "redirector", "--redis", rd.URL(), "--cgroup", cg.Path, "--pin-dir", pinDir,
		"--resync", "1s", "--metrics", metrics)
	testutil.WaitTCP(t, metrics, 15*time.Second)
	assertNotReadyFor(t, metrics, time.Second, "first full load of the registry not in the route map yet")

	rd.Start()
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
	waitLog(t, r, "tether redirector ready")
	hangUp(t, r)
	waitLog(t, r, "nothing to reload")

	rd.Stop()
	start := time.Now()
	waitProbe(t, metrics, "/readyz", http.StatusServiceUnavailable, "route map last synced")
	if took := time.Since(start); took < 10*time.Second {
		t.Fatalf("not ready %v after Redis stopped: the bound is 2×1s+10s", took)
	}
	waitProbe(t, metrics, "/healthz", http.StatusOK, "ok")
	rd.Start()
	waitProbe(t, metrics, "/readyz", http.StatusOK, "ready")
	r.stop()
	for _, want := range []string{"redirector stopping", "tether redirector stopped"} {
		if !strings.Contains(r.Output(), want) {
			t.Errorf("the redirector's log lacks %q", want)
		}
	}
}

// SIGHUP makes the PS re-read its token file: a token added is accepted
// at once, a token removed is refused, the tunnel of an agent already up
// keeps running, and a broken file is refused with the old tokens kept.
func TestPSReloadsTokensOnSIGHUP(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	ps1 := startPSProc(t, rd.URL(), "ps1")
	tokenFile := ps1.args[slices.Index(ps1.args, "--token-file")+1]
	srv := tunneltest.IdentityServer(t, "agent-a1")
	startProc(t, "agent a1", "agent", "--server", ps1.listen, "--tunnels", "1", "--id", "a1",
		"--ip", "127.77.0.1", "--expose", "9100="+srv)
	backend := waitPS(t, reg, netip.MustParseAddrPort("127.77.0.1:9100"), "ps1")["ps1"]

	handshake := func(token, id string) error {
		s, err := tunneltest.Handshake(ps1.listen, &tunnel.Hello{AgentID: id, AgentIP: netip.MustParseAddr("127.77.0.9"),
			Token: token, Epoch: uint64(time.Now().UnixNano()), Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.77.0.9:9")}})
		if err == nil {
			_ = s.Close()
		}
		return err
	}
	const newToken = "rotated-token-2"
	if err := handshake(newToken, "b1"); err == nil {
		t.Fatal("a token not in the file yet was accepted")
	}
	if err := os.WriteFile(tokenFile, []byte(newToken+" * "+tunneltest.AgentRange+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	hangUp(t, ps1.proc)
	waitLog(t, ps1.proc, "SIGHUP: reloaded")
	if !strings.Contains(ps1.Output(), "1 added, 1 removed") {
		t.Errorf("the reload log does not say what changed:\n%s", ps1.Output())
	}
	if err := handshake(newToken, "b1"); err != nil {
		t.Fatalf("the new token after SIGHUP: %v", err)
	}
	err = handshake(tunneltest.Token, "b2")
	if err == nil || !strings.Contains(err.Error(), "unauthorized") {
		t.Fatalf("the removed token after SIGHUP: %v, want refused as unauthorized", err)
	}
	askVia(t, backend, "agent-a1") // the tunnel admitted with the old token keeps serving

	// A broken file: refused, logged, the tokens in force stay.
	if err := os.WriteFile(tokenFile, []byte("just-a-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	hangUp(t, ps1.proc)
	waitLog(t, ps1.proc, "SIGHUP reload failed")
	if err := handshake(newToken, "b3"); err != nil {
		t.Fatalf("the token in force after a refused reload: %v", err)
	}
}

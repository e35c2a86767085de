package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
)

// A second `tether ps --id ps1` while ps1 is live exits non-zero with a
// one-line error naming the live instance, and clients of the live one
// see no failure meanwhile.
func TestSecondPSWithALiveIDExitsAndTheFirstKeepsServing(t *testing.T) {
	rd, reg, ps1 := psWithAgent(t)
	be := waitPS(t, reg, a1Target, "ps1")["ps1"]

	var attempts, failures atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			attempts.Add(1)
			// Through the registry, as a reader would: the route itself
			// must not move either.
			bs := backendsOf(t, reg, a1Target)
			if got, err := tunneltest.Ask(bs["ps1"].Address.String()); err != nil || got != "agent-a1" || bs["ps1"].Address != be.Address {
				failures.Add(1)
			}
		}
	}()
	second := startProc(t, "ps1 again", "ps", "--id", "ps1", "--listen", freeAddr(t), "--advertise", "127.0.0.2",
		"--ports", tunneltest.FreeRange(t, 20), "--redis", rd.URL(), "--lease", "2s", "--renew", "500ms",
		"--token-file", tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n"),
		"--agent-cidrs", tunneltest.AgentRange)
	code, last := waitExit(t, second.Proc, 30*time.Second)
	// A little more traffic after the refusal, then the verdict.
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()

	want := "tether: ps id ps1 is held by a live instance at 127.0.0.1 (lease expires in "
	if code == 0 || !strings.HasPrefix(last, want) || !strings.HasSuffix(last, "; stop it or pick another --id") {
		t.Fatalf("second ps: exit %d, last line %q; want non-zero and %q...", code, last, want)
	}
	t.Logf("second ps: exit %d: %s; clients of ps1: %d failures of %d", code, last, failures.Load(), attempts.Load())
	if failures.Load() != 0 || attempts.Load() < 5 {
		t.Errorf("clients of the live ps1: %d failures of %d", failures.Load(), attempts.Load())
	}
	select {
	case <-ps1.Done():
		t.Fatalf("the live ps1 exited:\n%s", ps1.Output())
	default:
	}
}

// A PS whose lease another instance took over (the lease's nonce is
// rewritten in Redis, as another instance's claim would) stops serving and
// exits non-zero, leaving the routes under its id alone.
func TestPSWhoseLeaseIsTakenExits(t *testing.T) {
	rd, reg, ps1 := psWithAgent(t)
	be := waitPS(t, reg, a1Target, "ps1")["ps1"]
	askVia(t, be, "agent-a1")

	respCmd(t, rd.Addr(), "HSET", "{tether}:ps:ps1", "nonce", "another-instance")
	code, last := waitExit(t, ps1.Proc, 20*time.Second)
	want := "tether: stopped serving: renew lease of ps ps1: ps lease taken over by another instance"
	if code == 0 || !strings.HasPrefix(last, want) {
		t.Fatalf("ps1: exit %d, last line %q; want non-zero and %q...", code, last, want)
	}
	t.Logf("ps1: exit %d: %s", code, last)
	if got, err := tunneltest.Ask(be.Address.String()); err == nil && got != "" {
		t.Errorf("the taken-over ps still serves %s: %q", be.Address, got)
	}
	used, err := reg.PortsInUse(context.Background(), "ps1")
	if err != nil || used[be.Address] != a1Target {
		t.Errorf("the taken-over ps withdrew the id's routes: ports in use %v, %v", used, err)
	}
}

// A PS restarted right after a crash, while its predecessor's lease is
// still live, is not refused: nobody renews that lease, so the new
// instance waits it out and takes the id over.
func TestPSRestartedRightAfterACrashTakesItsIDOver(t *testing.T) {
	_, reg, ps1 := psWithAgent(t)
	waitPS(t, reg, a1Target, "ps1")
	ps1.kill9()
	killed := time.Now()
	ps1.restart(t) // waits for the tunnel listener: the start was not refused
	askVia(t, waitPS(t, reg, a1Target, "ps1")["ps1"], "agent-a1")
	t.Logf("serving again %v after the crash (lease 2s)", time.Since(killed).Round(time.Millisecond))
}

// a1Target is the endpoint agent a1 exposes in these tests.
var a1Target = netip.MustParseAddrPort("127.77.0.1:9100")

// psWithAgent starts Redis, the PS process ps1 and agent a1 exposing an
// identity service ("agent-a1") at a1Target through it.
func psWithAgent(t *testing.T) (*testutil.Redis, *registry.Registry, *psProc) {
	t.Helper()
	rd := testutil.StartRedis(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	ps1 := startPSProc(t, rd.URL(), "ps1")
	srv := tunneltest.IdentityServer(t, "agent-a1")
	startProc(t, "agent a1", "agent", "--server", ps1.listen, "--id", "a1", "--tunnels", "1",
		"--ip", "127.77.0.1", "--expose", "9100="+srv, "--backoff-min", "100ms", "--backoff-max", "1s")
	return rd, reg, ps1
}

// waitExit waits for p to exit and returns its exit code and the last line
// of its output.
func waitExit(t *testing.T, p *testutil.Proc, timeout time.Duration) (int, string) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(timeout):
		t.Fatalf("%s still running after %v:\n%s", p.Name, timeout, p.Output())
	}
	lines := strings.Split(strings.TrimSpace(p.Output()), "\n")
	return p.Cmd.ProcessState.ExitCode(), lines[len(lines)-1]
}

// respCmd sends one command to the Redis at addr (RESP by hand: registry
// is the one package that imports a Redis client) and fails the test on
// an error reply.
func respCmd(t *testing.T, addr string, args ...string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write([]byte(b.String())); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.HasPrefix(line, "-") {
		t.Fatalf("redis %v: %q, %v", args, line, err)
	}
}

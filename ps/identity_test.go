package ps_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
)

func shortLease(c *ps.Config) {
	c.Lease = 2 * time.Second
	c.Renew = 500 * time.Millisecond
}

// askLoop asks addr for want until stop is closed and counts the answers
// that were not want (errors included).
type askLoop struct {
	attempts, failures atomic.Int64
	stop               chan struct{}
	done               sync.WaitGroup
	mu                 sync.Mutex
	lastErr            string
}

func startAskLoop(addr, want string) *askLoop {
	l := &askLoop{stop: make(chan struct{})}
	l.done.Add(1)
	go func() {
		defer l.done.Done()
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			l.attempts.Add(1)
			if got, err := tunneltest.Ask(addr); err != nil || got != want {
				l.failures.Add(1)
				l.mu.Lock()
				l.lastErr = fmt.Sprintf("got %q, %v", got, err)
				l.mu.Unlock()
			}
		}
	}()
	return l
}

func (l *askLoop) end() (attempts, failures int64, last string) {
	close(l.stop)
	l.done.Wait()
	return l.attempts.Load(), l.failures.Load(), l.lastErr
}

// A second instance of a PS id refuses to start while the first is live,
// naming the first one's address, and the first one's routes and traffic
// are untouched meanwhile.
func TestSecondInstanceOfAnIDIsRefused(t *testing.T) {
	rd := testutil.StartRedis(t)
	first := tunneltest.StartPS(t, rd.URL(), "ps1", shortLease)
	reg := tunneltest.NewRegistry(t, rd.URL())
	srv := tunneltest.IdentityServer(t, "agent-a1")
	tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{first.Addr}, []string{"9100=" + srv}, func(c *agent.Config) { c.Tunnels = 1 })
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	be := tunneltest.WaitBackends(t, reg, target, 1)[0]
	ctx := context.Background()
	before, err := reg.PSLeases(ctx)
	if err != nil || before["ps1"].Nonce == "" {
		t.Fatalf("lease of the first instance: %+v, %v", before["ps1"], err)
	}

	loop := startAskLoop(be.Address.String(), "agent-a1")
	cfg := ps.DefaultConfig()
	cfg.ID, cfg.Listen, cfg.Advertise, cfg.Redis = "ps1", "127.0.0.1:0", []string{"127.0.0.2"}, rd.URL()
	cfg.Ports = tunneltest.FreeRange(t, 20)
	cfg.TokenFile = tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n")
	shortLease(&cfg)
	log, lb := tunneltest.NewLog(t, "ps1 again")
	cfg.Logger = log
	second, err := ps.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	err = second.Run(rctx)
	took := time.Since(start)
	attempts, failures, last := loop.end()

	if !errors.Is(err, registry.ErrLeaseHeld) || !strings.Contains(err.Error(), "held by a live instance at 127.0.0.1") ||
		!strings.Contains(err.Error(), "pick another --id") {
		t.Fatalf("second instance: got %v after %v, want a refusal naming 127.0.0.1\n%s", err, took, lb.String())
	}
	t.Logf("refused after %v: %v", took, err)
	if failures != 0 || attempts < 5 {
		t.Errorf("through the first instance during the attempt: %d failures of %d (last: %s)", failures, attempts, last)
	}
	after, err := reg.PSLeases(ctx)
	if err != nil || after["ps1"].Nonce != before["ps1"].Nonce || after["ps1"].Addr != before["ps1"].Addr {
		t.Errorf("lease after the refused start: %+v (%v), want %+v", after["ps1"], err, before["ps1"])
	}
	if got := tunneltest.WaitBackends(t, reg, target, 1)[0]; got.Address != be.Address {
		t.Errorf("route after the refused start: %v, want %v", got.Address, be.Address)
	}
}

// A PS whose id another instance took over stops serving, leaves the
// registry alone (the routes and lease under the id are the new holder's)
// and Run returns ErrLeaseTaken.
func TestATakenOverPSStopsServingAndExits(t *testing.T) {
	rd := testutil.StartRedis(t)
	cfg := ps.DefaultConfig()
	cfg.ID, cfg.Listen, cfg.Advertise, cfg.Redis = "ps1", "127.0.0.1:0", []string{"127.0.0.1"}, rd.URL()
	cfg.Ports = tunneltest.FreeRange(t, 20)
	cfg.TokenFile = tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n")
	cfg.AgentCIDRs = []string{tunneltest.AgentRange}
	shortLease(&cfg)
	cfg.Logger, _ = tunneltest.NewLog(t, "ps1")
	p, err := ps.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	addr, err := p.Addr(ctx)
	if err != nil {
		t.Fatal(err)
	}
	reg := tunneltest.NewRegistry(t, rd.URL())
	srv := tunneltest.IdentityServer(t, "agent-a1")
	tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{addr.String()}, []string{"9100=" + srv}, func(c *agent.Config) { c.Tunnels = 1 })
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	be := tunneltest.WaitBackends(t, reg, target, 1)[0]
	if got, err := tunneltest.Ask(be.Address.String()); err != nil || got != "agent-a1" {
		t.Fatalf("before the takeover: %q, %v", got, err)
	}

	// Another instance's claim, as Redis sees it: the lease's nonce changes.
	redisCmd(t, rd.Addr(), "HSET", "{tether}:ps:ps1", "nonce", "intruder")
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the PS kept running after its lease was taken")
	}
	if !errors.Is(err, registry.ErrLeaseTaken) {
		t.Fatalf("Run: %v, want ErrLeaseTaken", err)
	}
	t.Logf("Run returned: %v", err)
	if got, err := tunneltest.Ask(be.Address.String()); err == nil && got != "" {
		t.Errorf("the taken-over PS still serves its data port: %q", got)
	}
	// Nothing was withdrawn or forgotten: that state is the new holder's.
	snap, err := reg.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if snap.Leases["ps1"].Nonce != "intruder" {
		t.Errorf("lease after the exit: %+v, want the intruder's", snap.Leases["ps1"])
	}
	found := false
	for _, rt := range snap.Routes {
		for _, b := range rt.Backends {
			found = found || (rt.Target == target && b.PSID == "ps1" && b.Address.Port() == be.Address.Port())
		}
	}
	if !found {
		t.Errorf("the route under ps1 was withdrawn by the taken-over PS: %+v", snap.Routes)
	}
	if used, err := reg.PortsInUse(context.Background(), "ps1"); err != nil || used[be.Address] != target {
		t.Errorf("port index after the exit: %v, %v", used, err)
	}
}

// redisCmd sends one command to the Redis at addr and fails the test on
// an error reply (RESP by hand: registry is the one package that imports
// a Redis client).
func redisCmd(t *testing.T, addr string, args ...string) {
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

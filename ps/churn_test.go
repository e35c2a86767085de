package ps_test

import (
	"context"
	"fmt"
	"math/rand/v2"
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
)

// Agents come and go while clients keep connecting through mappings they
// refresh only now and then (a stale reader). Ports are released and
// re-allocated by other agents all the time, and no connection may ever
// reach an agent other than the one its target belongs to.
//
// The allocator hands ports out round-robin, so a port comes back soon
// after its release only when the range is nearly used up: the range is
// sized so that quarantine, not the range, sets when a port is reused. With
// the quarantine shorter than the readers' staleness (say 1.2s) this test
// sees hundreds of misroutes.
func TestPortChurnNeverMisroutes(t *testing.T) {
	rd := testutil.StartRedis(t)
	const (
		agents    = 5
		staleness = 2 * time.Second
		lease     = 500 * time.Millisecond
		run       = 10 * time.Second
	)
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.Ports = tunneltest.FreeRange(t, 16)
		c.Lease = lease
		c.Renew = 100 * time.Millisecond
		c.Quarantine = lease + staleness + 300*time.Millisecond // > lease + reader staleness
	})
	reg := tunneltest.NewRegistry(t, rd.URL())

	targets := make([]netip.AddrPort, agents)
	names := make([]string, agents)
	servers := make([]string, agents)
	for i := range agents {
		targets[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 77, 1, byte(10 + i)}), 9100)
		names[i] = fmt.Sprintf("agent-%d", i)
		servers[i] = tunneltest.IdentityServer(t, names[i])
	}
	owner := map[string]int{}
	for i, n := range names {
		owner[n] = i
	}
	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	var wg sync.WaitGroup
	// Churn: every agent reconnects again and again, with a new epoch,
	// sometimes exposing nothing for a while. Each agent logs into one
	// buffer for all its runs.
	for i := range agents {
		log, _ := tunneltest.NewLog(t, fmt.Sprintf("agent a%d (all runs)", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				_, _, stop, err := tunneltest.RunAgent(t, fmt.Sprintf("a%d", i), targets[i].Addr().String(), []string{ps.Addr},
					[]string{fmt.Sprintf("%d=%s", targets[i].Port(), servers[i])}, func(c *agent.Config) {
						c.Tunnels = 1
						c.Logger = log
					})
				if err != nil {
					t.Error(err)
					return
				}
				sleepCtx(ctx, time.Duration(200+rand.IntN(600))*time.Millisecond)
				stop()
				sleepCtx(ctx, time.Duration(rand.IntN(200))*time.Millisecond)
			}
		}()
	}
	// An observer watches the PS's ports in the registry and counts every
	// port that passes from one agent's target to another's: without such
	// reuse a stale mapping could not misroute, and the test proves nothing.
	var reuses atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		last := map[uint16]netip.AddrPort{}
		for ctx.Err() == nil {
			ports, err := reg.PortsInUse(ctx, "ps1")
			if err == nil {
				for p, tg := range ports {
					if prev, ok := last[p]; ok && prev != tg {
						reuses.Add(1)
					}
					last[p] = tg
				}
			}
			sleepCtx(ctx, 10*time.Millisecond)
		}
	}()
	// Clients with a stale cache of the routes.
	var good, wrong, failed atomic.Int64
	var wrongMsg atomic.Value
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cache := map[netip.AddrPort]netip.AddrPort{}
			refreshed := time.Time{}
			for ctx.Err() == nil {
				if time.Since(refreshed) > staleness {
					clear(cache)
					for _, tg := range targets {
						if rt, err := reg.Get(ctx, tg); err == nil {
							cache[tg] = rt.Backends[0].Address
						}
					}
					refreshed = time.Now()
				}
				i := rand.IntN(agents)
				addr, ok := cache[targets[i]]
				if !ok {
					sleepCtx(ctx, 10*time.Millisecond)
					continue
				}
				got, err := tunneltest.Ask(addr.String())
				// Identity first: bytes that name another agent are a
				// misroute even when the read then failed.
				switch {
				case got == names[i]:
					good.Add(1)
				case got != "" && !strings.HasPrefix(names[i], got):
					wrong.Add(1)
					wrongMsg.Store(fmt.Sprintf("connection for %s (%s) via %s reached %q (read error: %v)", targets[i], names[i], addr, got, err))
				default:
					// Refused, reset or cut short before naming anyone: fine.
					// Most are a stale mapping to a released port; the client
					// keeps using it (as a stale reader would) until it
					// refreshes, since that is how a reused port gets reached.
					failed.Add(1)
					sleepCtx(ctx, time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("connections: %d reached the right agent, %d failed cleanly, %d misrouted; %d ports passed to another agent",
		good.Load(), failed.Load(), wrong.Load(), reuses.Load())
	if wrong.Load() > 0 {
		t.Fatalf("%d connections misrouted, e.g. %s", wrong.Load(), wrongMsg.Load())
	}
	if n := reuses.Load(); n < 10 {
		t.Fatalf("only %d ports passed from one agent to another: the churn did not exercise port reuse", n)
	}
	if n := good.Load(); n < 200 {
		t.Fatalf("only %d connections reached their agent: the churn test did not exercise the data path", n)
	}
	if !strings.Contains(ps.Log.String(), "tunnel closed") {
		t.Fatal("no tunnel was ever closed: no churn happened")
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

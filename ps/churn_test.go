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
// re-allocated all the time in a tiny range, and no connection may ever
// reach an agent other than the one its target belongs to.
func TestPortChurnNeverMisroutes(t *testing.T) {
	rd := testutil.StartRedis(t)
	const staleness = 1500 * time.Millisecond
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.Ports = tunneltest.FreeRange(t, 6)
		c.Lease = time.Second
		c.Renew = 200 * time.Millisecond
		c.Quarantine = 2*time.Second + staleness // > lease + reader staleness
	})
	reg := tunneltest.NewRegistry(t, rd.URL())

	const agents = 5
	targets := make([]netip.AddrPort, agents)
	servers := make([]string, agents)
	for i := range agents {
		targets[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 77, 1, byte(10 + i)}), 9100)
		servers[i] = tunneltest.IdentityServer(t, fmt.Sprintf("agent-%d", i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	// Churn: every agent reconnects again and again, with a new epoch,
	// sometimes exposing nothing for a while.
	for i := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				_, _, stop := tunneltest.StartAgent(t, fmt.Sprintf("a%d", i), targets[i].Addr().String(), []string{ps.Addr},
					[]string{fmt.Sprintf("%d=%s", targets[i].Port(), servers[i])}, func(c *agent.Config) { c.Tunnels = 1 })
				sleepCtx(ctx, time.Duration(200+rand.IntN(800))*time.Millisecond)
				stop()
				sleepCtx(ctx, time.Duration(rand.IntN(300))*time.Millisecond)
			}
		}()
	}
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
				switch {
				case err != nil || got == "":
					failed.Add(1) // a refused or reset connection is fine
				case got != fmt.Sprintf("agent-%d", i):
					wrong.Add(1)
					wrongMsg.Store(fmt.Sprintf("connection for %s via %s reached %q", targets[i], addr, got))
				default:
					good.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("connections: %d reached the right agent, %d failed cleanly, %d misrouted", good.Load(), failed.Load(), wrong.Load())
	if wrong.Load() > 0 {
		t.Fatalf("%d connections misrouted, e.g. %s", wrong.Load(), wrongMsg.Load())
	}
	if good.Load() < 50 {
		t.Fatalf("only %d good connections: the churn test did not exercise the data path", good.Load())
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

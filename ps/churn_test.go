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
	"github.com/tether-net/tether/registry"
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
//
// It runs against both data planes: with sk_lookup, releasing a pair is a
// map delete and reusing it a map update, and the pairs spread over two
// advertise addresses, so the quarantine is checked per (address, port).
func TestPortChurnNeverMisroutes(t *testing.T) {
	for _, plane := range []struct {
		name      string
		advertise []string
		ports     int // per address: 16 pairs in all either way
	}{
		{ps.DataPlaneSKLookup, []string{"127.0.0.1", "127.0.0.2"}, 8},
		{ps.DataPlaneListeners, []string{"127.0.0.1"}, 16},
	} {
		t.Run(plane.name, func(t *testing.T) {
			if plane.name == ps.DataPlaneSKLookup {
				testutil.RequirePrivateNetns(t)
			}
			testPortChurn(t, plane.name, plane.advertise, plane.ports)
		})
	}
}

func testPortChurn(t *testing.T, plane string, advertise []string, ports int) {
	rd := testutil.StartRedis(t)
	const (
		agents    = 5
		staleness = 2 * time.Second
		lease     = 500 * time.Millisecond
		run       = 10 * time.Second
	)
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.Ports = tunneltest.FreeRange(t, ports)
		c.Advertise = advertise
		c.DataPlane = plane
		c.Lease = lease
		c.Renew = 100 * time.Millisecond
		c.Quarantine = lease + staleness + 300*time.Millisecond // > lease + reader staleness
	})
	c := &churn{t: t, reg: tunneltest.NewRegistry(t, rd.URL()), psAddr: node.Addr, staleness: staleness}
	for i := range agents {
		c.targets = append(c.targets, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 77, 1, byte(10 + i)}), 9100))
		c.names = append(c.names, fmt.Sprintf("agent-%d", i))
		c.servers = append(c.servers, tunneltest.IdentityServer(t, c.names[i]))
	}
	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	var wg sync.WaitGroup
	for i := range agents {
		wg.Go(func() { c.agentLoop(ctx, i) })
	}
	wg.Go(func() { c.observeReuse(ctx) })
	for range 4 {
		wg.Go(func() { c.staleClient(ctx) })
	}
	wg.Wait()
	t.Logf("connections: %d reached the right agent, %d failed cleanly, %d misrouted; %d ports passed to another agent",
		c.good.Load(), c.failed.Load(), c.wrong.Load(), c.reuses.Load())
	if c.wrong.Load() > 0 {
		t.Fatalf("%d connections misrouted, e.g. %s", c.wrong.Load(), c.wrongMsg.Load())
	}
	if n := c.reuses.Load(); n < 10 {
		t.Fatalf("only %d ports passed from one agent to another: the churn did not exercise port reuse", n)
	}
	if n := c.good.Load(); n < 200 {
		t.Fatalf("only %d connections reached their agent: the churn test did not exercise the data path", n)
	}
	if !strings.Contains(node.Log.String(), "tunnel closed") {
		t.Fatal("no tunnel was ever closed: no churn happened")
	}
}

// churn is the port-churn experiment: agents that come and go, clients
// with a stale view of the routes, and what they saw.
type churn struct {
	t         *testing.T
	reg       *registry.Registry
	psAddr    string
	staleness time.Duration
	targets   []netip.AddrPort
	names     []string // names[i] answers for targets[i]
	servers   []string // the identity server behind targets[i]

	good, wrong, failed, reuses atomic.Int64
	wrongMsg                    atomic.Value
}

// agentLoop reconnects agent i again and again, with a new epoch each
// time, sometimes exposing nothing for a while. It logs into one buffer
// for all its runs.
func (c *churn) agentLoop(ctx context.Context, i int) {
	log, _ := tunneltest.NewLog(c.t, fmt.Sprintf("agent a%d (all runs)", i))
	for ctx.Err() == nil {
		_, _, stop, err := tunneltest.RunAgent(c.t, fmt.Sprintf("a%d", i), c.targets[i].Addr().String(), []string{c.psAddr},
			[]string{fmt.Sprintf("%d=%s", c.targets[i].Port(), c.servers[i])}, func(cfg *agent.Config) {
				cfg.Tunnels = 1
				cfg.Logger = log
			})
		if err != nil {
			c.t.Error(err)
			return
		}
		sleepCtx(ctx, time.Duration(200+rand.IntN(600))*time.Millisecond)
		stop()
		sleepCtx(ctx, time.Duration(rand.IntN(200))*time.Millisecond)
	}
}

// observeReuse watches the PS's ports in the registry and counts every
// port that passes from one agent's target to another's: without such
// reuse a stale mapping could not misroute, and the test proves nothing.
func (c *churn) observeReuse(ctx context.Context) {
	last := map[netip.AddrPort]netip.AddrPort{}
	for ctx.Err() == nil {
		ports, err := c.reg.PortsInUse(ctx, "ps1")
		if err == nil {
			for p, tg := range ports {
				if prev, ok := last[p]; ok && prev != tg {
					c.reuses.Add(1)
				}
				last[p] = tg
			}
		}
		sleepCtx(ctx, 10*time.Millisecond)
	}
}

// staleClient connects to random targets through a cache of the routes it
// refreshes only every staleness, and judges each answer by identity.
func (c *churn) staleClient(ctx context.Context) {
	cache := map[netip.AddrPort]netip.AddrPort{}
	refreshed := time.Time{}
	for ctx.Err() == nil {
		if time.Since(refreshed) > c.staleness {
			clear(cache)
			for _, tg := range c.targets {
				if rt, err := c.reg.Get(ctx, tg); err == nil {
					cache[tg] = rt.Backends[0].Address
				}
			}
			refreshed = time.Now()
		}
		i := rand.IntN(len(c.targets))
		addr, ok := cache[c.targets[i]]
		if !ok {
			sleepCtx(ctx, 10*time.Millisecond)
			continue
		}
		got, err := tunneltest.Ask(addr.String())
		// Identity first: bytes that name another agent are a misroute
		// even when the read then failed.
		switch {
		case got == c.names[i]:
			c.good.Add(1)
		case got != "" && !strings.HasPrefix(c.names[i], got):
			c.wrong.Add(1)
			c.wrongMsg.Store(fmt.Sprintf("connection for %s (%s) via %s reached %q (read error: %v)", c.targets[i], c.names[i], addr, got, err))
		default:
			// Refused, reset or cut short before naming anyone: fine. Most
			// are a stale mapping to a released port; the client keeps using
			// it (as a stale reader would) until it refreshes, since that is
			// how a reused port gets reached.
			c.failed.Add(1)
			sleepCtx(ctx, time.Millisecond)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

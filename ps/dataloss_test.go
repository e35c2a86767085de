package ps_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
)

// After a FLUSHALL, a PS learns from its next renewal that the registry
// lost its data and republishes every binding at once: the routes list is
// whole again within about one renew interval (not the periodic resync's
// 10s), a mirror never loses the backend meanwhile, and traffic through
// the PS never fails.
func TestFlushAllIsRepairedByThePSWithinARenewal(t *testing.T) {
	rd := testutil.StartRedis(t)
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.Lease = time.Second
		c.Renew = 250 * time.Millisecond
	})
	reg := tunneltest.NewRegistry(t, rd.URL())
	srv := tunneltest.IdentityServer(t, "agent-a1")
	var expose []string
	for i := range 5 {
		expose = append(expose, fmt.Sprintf("%d=%s", 9100+i, srv))
	}
	tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{node.Addr}, expose, func(c *agent.Config) { c.Tunnels = 1 })
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	be := tunneltest.WaitBackends(t, reg, target, 1)[0]
	ctx := context.Background()
	var before []registry.Route
	testutil.Eventually(t, 10*time.Second, "all 5 routes published", func() error {
		var err error
		if before, err = reg.List(ctx); err != nil || len(before) != 5 {
			return fmt.Errorf("%d routes, %v", len(before), err)
		}
		return nil
	})

	m, err := registry.NewMirror(registry.MirrorConfig{Registry: reg, Resync: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(mctx) }()
	defer func() { cancel(); <-done }()
	<-m.Ready()

	loop := startAskLoop(be.Address.String(), "agent-a1")
	redisCmd(t, rd.Addr(), "FLUSHALL")
	flushed := time.Now()
	var whole time.Duration
	for whole == 0 {
		if time.Since(flushed) > 5*time.Second {
			t.Fatalf("routes not back 5s after FLUSHALL (the periodic resync is 10s)\n%s", node.Log.String())
		}
		if bs, _ := m.Lookup(target); len(bs) != 1 || !bs[0].Live {
			t.Fatalf("%v after FLUSHALL the mirror lost the backend: %+v", time.Since(flushed), bs)
		}
		if after, err := reg.List(ctx); err == nil && sameRoutes(before, after) {
			whole = time.Since(flushed)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The mirror keeps the backend through its repair window too.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if bs, _ := m.Lookup(target); len(bs) != 1 || !bs[0].Live {
			t.Fatalf("the mirror lost the backend after the repair: %+v", bs)
		}
	}
	attempts, failures, last := loop.end()
	if failures != 0 {
		t.Errorf("%d of %d requests through the PS failed (last: %s)", failures, attempts, last)
	}
	if !strings.Contains(node.Log.String(), "republishing every binding") {
		t.Errorf("the PS did not log the republish:\n%s", node.Log.String())
	}
	t.Logf("registry whole again %v after FLUSHALL (renew 250ms); %d requests, none failed", whole.Round(time.Millisecond), attempts)
}

func sameRoutes(a, b []registry.Route) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Target != b[i].Target || len(a[i].Backends) != len(b[i].Backends) {
			return false
		}
		for j := range a[i].Backends {
			x, y := a[i].Backends[j], b[i].Backends[j]
			if x.PSID != y.PSID || x.Address != y.Address || x.AgentID != y.AgentID {
				return false
			}
		}
	}
	return true
}

package ps_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
)

// One PS serves 50,000 endpoints (50 agents x 1,000) with the process's
// open-file limit at 20,000, on two advertise addresses: with a listening
// socket per port it would stop near 19,000. Every endpoint's route is in
// the registry with a distinct (address, port), and 1,000 endpoints
// spread over the whole range each answer with their own agent's identity.
func TestFiftyThousandEndpointsOnOnePS(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	const (
		agents   = 50
		perAgent = 1000
		total    = agents * perAgent
		fdLimit  = 20000
		sample   = 1000
	)
	limitOpenFiles(t, fdLimit)
	rd := testutil.StartRedis(t)
	fdsBefore := openFiles(t)
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.DataPlane = ps.DataPlaneSKLookup
		c.Advertise = []string{"127.0.0.2", "127.0.0.3"}
		c.Ports = "20000-44999" // 25,000 ports on each of two addresses: exactly 50,000 pairs
		c.CredEndpoints = total
		c.HandshakeTimeout = time.Minute
	})
	reg := tunneltest.NewRegistry(t, rd.URL())

	names := make([]string, agents)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, agents)
	for i := range agents {
		names[i] = fmt.Sprintf("agent-a%d", i)
		srv := tunneltest.IdentityServer(t, names[i])
		expose := make([]string, perAgent)
		for k := range perAgent {
			expose[k] = fmt.Sprintf("%d=%s", 10000+k, srv)
		}
		wg.Go(func() {
			_, _, _, err := tunneltest.RunAgent(t, fmt.Sprintf("a%d", i), agentIP(i).String(), []string{node.Addr}, expose, func(c *agent.Config) {
				c.Tunnels = 1
			})
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	var routes []registry.Route
	testutil.Eventually(t, 2*time.Minute, fmt.Sprintf("%d routes in the registry", total), func() error {
		var err error
		routes, err = reg.List(context.Background())
		if err != nil {
			return err
		}
		if len(routes) != total {
			return fmt.Errorf("%d routes", len(routes))
		}
		return nil
	})
	took := time.Since(start)

	// Distinct (address, port) pairs, every one on an advertise address.
	seen := make(map[netip.AddrPort]netip.AddrPort, total)
	perAddr := map[netip.Addr]int{}
	for _, r := range routes {
		if len(r.Backends) != 1 {
			t.Fatalf("route %s has %d backends, want 1", r.Target, len(r.Backends))
		}
		at := r.Backends[0].Address
		if prev, dup := seen[at]; dup {
			t.Fatalf("%s serves both %s and %s", at, prev, r.Target)
		}
		seen[at] = r.Target
		perAddr[at.Addr()]++
	}
	if len(perAddr) != 2 || perAddr[netip.MustParseAddr("127.0.0.2")] != total/2 {
		t.Fatalf("pairs per advertise address %v, want %d on each of 127.0.0.2 and 127.0.0.3", perAddr, total/2)
	}

	// 1,000 endpoints spread evenly over the routes (sorted by target, so
	// over every agent), asked in parallel.
	step := total / sample
	var mu sync.Mutex
	var wrong []string
	var asked sync.WaitGroup
	jobs := make(chan registry.Route)
	for range 16 {
		asked.Go(func() {
			for r := range jobs {
				want := names[agentIndex(t, r.Target.Addr())]
				got, err := tunneltest.Ask(r.Backends[0].Address.String())
				if err != nil || got != want {
					mu.Lock()
					wrong = append(wrong, fmt.Sprintf("%s via %s: got %q, %v; want %q", r.Target, r.Backends[0].Address, got, err, want))
					mu.Unlock()
				}
			}
		})
	}
	for i := 0; i < total; i += step {
		jobs <- routes[i]
	}
	close(jobs)
	asked.Wait()
	if len(wrong) > 0 {
		t.Fatalf("%d of %d sampled endpoints did not answer with their agent's identity, e.g.\n%s", len(wrong), sample, strings.Join(wrong[:min(5, len(wrong))], "\n"))
	}
	fds := openFiles(t)
	if fds >= fdLimit {
		t.Fatalf("the process holds %d files, at the limit %d", fds, fdLimit)
	}
	t.Logf("FIGURE fifty_thousand: %d endpoints on 2 addresses registered in %v (%.0f endpoints/s); %d sampled answered right; open files %d -> %d (limit %d, whole test process: PS, 50 agents, Redis clients)",
		total, took.Round(time.Millisecond), float64(total)/took.Seconds(), sample, fdsBefore, fds, fdLimit)
}

// agentIP is the address agent i exposes its endpoints on.
func agentIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{127, 77, 2, byte(1 + i)}) }

func agentIndex(t *testing.T, a netip.Addr) int {
	b := a.As4()
	if b[0] != 127 || b[1] != 77 || b[2] != 2 {
		t.Fatalf("target address %s is not an agent's", a)
	}
	return int(b[3]) - 1
}

// limitOpenFiles lowers the process's soft open-file limit to n for the
// test (the hard limit stays) and restores it after.
func limitOpenFiles(t *testing.T, n uint64) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = min(n, old.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("set the open-file limit to %d: %v", n, err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	if lim.Cur > n {
		t.Fatalf("open-file limit %d, want at most %d", lim.Cur, n)
	}
}

// openFiles counts this process's open file descriptors.
func openFiles(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

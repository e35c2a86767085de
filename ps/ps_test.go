package tunnel_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
	"github.com/tether-net/tether/tunnel/tunneltest"
)

// rawHello dials the PS and runs a handshake as an agent would.
func rawHello(t *testing.T, addr string, h *tunnel.Hello) (*tunnel.AgentSession, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return tunnel.Handshake(context.Background(), c, h, tunnel.ClientConfig{Timeout: 5 * time.Second})
}

// rawRefusal sends raw bytes to the PS and returns the Refuse it answers.
func rawRefusal(t *testing.T, addr string, b []byte) *tunnel.Refuse {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if len(b) > 0 {
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	all, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read refusal: %v", err)
	}
	if len(all) < 5 || all[0] != 3 {
		t.Fatalf("ps answered %q, want a refuse frame", all)
	}
	r, err := tunnel.DecodeRefuse(all[5:])
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func preamble(version byte) []byte { return append(tunnel.Magic[:], version) }

// Bad input of every kind is refused with a clear logged reason, and the
// tunnel of a well-behaved agent keeps carrying traffic throughout
// (DESIGN invariant 7).
func TestBadInputIsRefusedWhileAGoodTunnelKeepsWorking(t *testing.T) {
	rd := testutil.StartRedis(t)
	tokens := tunneltest.WriteTokens(t, "# agents\ngood-token\nlimited-token 127.80.0.0/16\n")
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *tunnel.PSConfig) {
		c.TokenFile = tokens
		c.HandshakeTimeout = 700 * time.Millisecond
	})
	reg := tunneltest.NewRegistry(t, rd.URL())
	srv := tunneltest.IdentityServer(t, "agent-a1")
	tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{ps.Addr}, []string{"9100=" + srv}, func(c *agent.Config) {
		c.Token = "good-token"
		c.Tunnels = 1
	})
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	be := tunneltest.WaitBackends(t, reg, target, 1)[0]
	stillWorks := func(after string) {
		t.Helper()
		got, err := tunneltest.Ask(be.Address.String())
		if err != nil || got != "agent-a1" {
			t.Fatalf("after %s, the good tunnel answered %q, %v", after, got, err)
		}
	}
	stillWorks("start")

	hello := func(mod func(h *tunnel.Hello)) *tunnel.Hello {
		h := &tunnel.Hello{AgentID: "bad", AgentIP: netip.MustParseAddr("127.78.0.1"), Token: "good-token", Epoch: 1,
			Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.78.0.1:80")}}
		if mod != nil {
			mod(h)
		}
		return h
	}
	cases := []struct {
		name    string
		run     func(t *testing.T) (tunnel.Code, string)
		code    tunnel.Code
		logSays string
	}{
		{"garbage bytes", func(t *testing.T) (tunnel.Code, string) {
			r := rawRefusal(t, ps.Addr, []byte("\x16\x03\x01 hello? this is not tether"))
			return r.Code, r.Reason
		}, tunnel.CodeBadRequest, "bad magic"},
		{"unknown version", func(t *testing.T) (tunnel.Code, string) {
			r := rawRefusal(t, ps.Addr, preamble(9))
			return r.Code, r.Reason
		}, tunnel.CodeVersion, "agent speaks version 9"},
		{"oversized frame", func(t *testing.T) (tunnel.Code, string) {
			r := rawRefusal(t, ps.Addr, append(preamble(tunnel.Version), 1, 0x40, 0, 0, 0))
			return r.Code, r.Reason
		}, tunnel.CodeTooLarge, "frame of 1073741824 bytes"},
		{"slow handshake", func(t *testing.T) (tunnel.Code, string) {
			r := rawRefusal(t, ps.Addr, preamble(tunnel.Version)) // then silence
			return r.Code, r.Reason
		}, tunnel.CodeTimeout, "handshake not completed within 700ms"},
		{"wrong token", func(t *testing.T) (tunnel.Code, string) {
			_, err := rawHello(t, ps.Addr, hello(func(h *tunnel.Hello) { h.Token = "guess" }))
			var rf *tunnel.Refuse
			if !errors.As(err, &rf) {
				t.Fatalf("got %v, want a refusal", err)
			}
			return rf.Code, rf.Reason
		}, tunnel.CodeUnauthorized, "token not accepted"},
		{"token limited to other CIDRs", func(t *testing.T) (tunnel.Code, string) {
			_, err := rawHello(t, ps.Addr, hello(func(h *tunnel.Hello) { h.Token = "limited-token" }))
			var rf *tunnel.Refuse
			if !errors.As(err, &rf) {
				t.Fatalf("got %v, want a refusal", err)
			}
			return rf.Code, rf.Reason
		}, tunnel.CodeForbidden, "outside the CIDRs"},
		{"exposure of another agent's live route", func(t *testing.T) (tunnel.Code, string) {
			s, err := rawHello(t, ps.Addr, hello(func(h *tunnel.Hello) {
				h.AgentID = "intruder"
				h.AgentIP = netip.MustParseAddr("127.77.0.1")
				h.Endpoints = []netip.AddrPort{target, netip.MustParseAddrPort("127.77.0.1:9200")}
			}))
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			defer s.Close()
			if s.Welcome.Endpoints[1].Port == 0 {
				t.Fatalf("the intruder's free endpoint was refused too: %+v", s.Welcome.Endpoints[1])
			}
			r := s.Welcome.Endpoints[0]
			return r.Code, r.Reason
		}, tunnel.CodeConflict, `held by agent \"a1\"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, reason := c.run(t)
			if code != c.code || reason == "" {
				t.Fatalf("refused with %v %q, want %v with a reason", code, reason, c.code)
			}
			testutil.Eventually(t, 5*time.Second, "the ps logs the reason", func() error {
				if !strings.Contains(ps.Log.String(), c.logSays) {
					return fmt.Errorf("log lacks %q", c.logSays)
				}
				return nil
			})
			stillWorks(c.name)
		})
	}
	// The intruder never took the route over.
	rt, err := reg.Get(context.Background(), target)
	if err != nil || len(rt.Backends) != 1 || rt.Backends[0].AgentID != "a1" {
		t.Fatalf("route after the attacks: %+v, %v", rt, err)
	}
}

// A newer epoch of the same agent takes over at once, keeps the ports of
// the targets it exposes again, and an older epoch arriving late is
// refused. The old, half-open session never blocks the new one.
func TestNewestEpochWins(t *testing.T) {
	rd := testutil.StartRedis(t)
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", nil)
	reg := tunneltest.NewRegistry(t, rd.URL())
	target := netip.MustParseAddrPort("127.77.0.5:9100")
	h := func(epoch uint64, eps ...string) *tunnel.Hello {
		out := &tunnel.Hello{AgentID: "a5", AgentIP: target.Addr(), Epoch: epoch}
		for _, e := range eps {
			out.Endpoints = append(out.Endpoints, netip.MustParseAddrPort(e))
		}
		return out
	}
	// The old session is never read from again: a half-open tunnel.
	old, err := rawHello(t, ps.Addr, h(10, "127.77.0.5:9100", "127.77.0.5:9200"))
	if err != nil {
		t.Fatal(err)
	}
	oldPort := old.Welcome.Endpoints[0].Port

	start := time.Now()
	nw, err := rawHello(t, ps.Addr, h(20, "127.77.0.5:9100"))
	if err != nil {
		t.Fatalf("newer epoch refused: %v", err)
	}
	defer nw.Close()
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("the new session waited %v for the old one", d)
	}
	if got := nw.Welcome.Endpoints[0].Port; got != oldPort {
		t.Fatalf("the same target moved from port %d to %d", oldPort, got)
	}
	select {
	case <-old.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the superseded session was not closed")
	}
	_, err = rawHello(t, ps.Addr, h(15, "127.77.0.5:9100"))
	var rf *tunnel.Refuse
	if !errors.As(err, &rf) || rf.Code != tunnel.CodeStaleEpoch {
		t.Fatalf("older epoch: got %v, want stale_epoch", err)
	}
	// 9200 was dropped by the new session: withdrawn.
	testutil.Eventually(t, 5*time.Second, "the dropped endpoint is withdrawn", func() error {
		if _, err := reg.Get(context.Background(), netip.MustParseAddrPort("127.77.0.5:9200")); !errors.Is(err, registry.ErrNotFound) {
			return fmt.Errorf("still there: %v", err)
		}
		return nil
	})
	rt, err := reg.Get(context.Background(), target)
	if err != nil || rt.Backends[0].Address.Port() != oldPort {
		t.Fatalf("route of the kept target: %+v, %v", rt, err)
	}
}

// Agents come and go while clients keep connecting through mappings they
// refresh only now and then (a stale reader). Ports are released and
// re-allocated all the time in a tiny range, and no connection may ever
// reach an agent other than the one its target belongs to.
func TestPortChurnNeverMisroutes(t *testing.T) {
	rd := testutil.StartRedis(t)
	const staleness = 1500 * time.Millisecond
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *tunnel.PSConfig) {
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

// A drain (SIGTERM) marks the PS draining so readers stop using it at once,
// withdraws its routes, and lets a connection in flight finish.
func TestDrainWithdrawsFirstAndLetsInFlightFinish(t *testing.T) {
	rd := testutil.StartRedis(t)
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", nil)
	reg := tunneltest.NewRegistry(t, rd.URL())
	// A local server that answers only after the client has sent "go".
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			go func() {
				defer c.Close()
				buf := make([]byte, 2)
				if _, err := io.ReadFull(c, buf); err == nil {
					_, _ = io.WriteString(c, "finished")
				}
			}()
		}
	}()
	tunneltest.StartAgent(t, "a1", "127.77.0.9", []string{ps.Addr}, []string{"9100=" + ln.Addr().String()}, func(c *agent.Config) { c.Tunnels = 1 })
	target := netip.MustParseAddrPort("127.77.0.9:9100")
	be := tunneltest.WaitBackends(t, reg, target, 1)[0]
	c, err := net.Dial("tcp", be.Address.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The connection is in flight once the agent has dialed the server.
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the connection never reached the local server")
	}
	stopped := make(chan struct{})
	go func() { ps.Stop(); close(stopped) }()
	testutil.Eventually(t, 5*time.Second, "route gone while draining", func() error {
		if _, err := reg.Get(context.Background(), target); !errors.Is(err, registry.ErrNotFound) {
			return fmt.Errorf("route still live: %v", err)
		}
		return nil
	})
	if _, err := io.WriteString(c, "go"); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if string(b) != "finished" {
		t.Fatalf("in-flight connection got %q, %v", b, err)
	}
	<-stopped
	if !strings.Contains(ps.Log.String(), "drained") {
		t.Fatal("ps did not log the end of its drain")
	}
}

// freezer relays TCP to a target until freeze: then it stops relaying
// without closing anything, so both ends hold a half-open connection (no
// FIN, no RST, no data), and it refuses new connections.
type freezer struct {
	ln     net.Listener
	frozen chan struct{}
	once   sync.Once
	conns  []net.Conn
	mu     sync.Mutex
}

func newFreezer(t *testing.T, target string) *freezer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln, frozen: make(chan struct{})}
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			f.mu.Lock()
			f.conns = append(f.conns, c, d)
			f.mu.Unlock()
			go f.relay(c, d)
			go f.relay(d, c)
		}
	}()
	return f
}

func (f *freezer) relay(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-f.frozen:
			return // drop the bytes, keep the sockets open
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (f *freezer) freeze() {
	f.once.Do(func() { close(f.frozen); f.ln.Close() })
}

func yamuxGoroutines() int {
	buf := make([]byte, 1<<22)
	n := runtime.Stack(buf, true)
	return strings.Count(string(buf[:n]), "hashicorp/yamux.(*Session)")
}

// A tunnel whose agent vanishes without a FIN (a half-open connection) is
// found dead by the keepalive in seconds, its route is withdrawn, and
// nothing of it stays behind: no session goroutine, no tunnel.
func TestHalfOpenTunnelIsReapedAndLeaksNothing(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg := prometheus.NewRegistry()
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *tunnel.PSConfig) { c.Registerer = reg })
	r := tunneltest.NewRegistry(t, rd.URL())
	fz := newFreezer(t, ps.Addr)
	srv := tunneltest.IdentityServer(t, "a1")
	tunneltest.StartAgent(t, "a1", "127.77.0.8", []string{fz.ln.Addr().String()}, []string{"9100=" + srv}, func(c *agent.Config) { c.Tunnels = 1 })
	target := netip.MustParseAddrPort("127.77.0.8:9100")
	be := tunneltest.WaitBackends(t, r, target, 1)[0]
	if got, err := tunneltest.Ask(be.Address.String()); err != nil || got != "a1" {
		t.Fatalf("before the freeze: %q, %v", got, err)
	}
	fz.freeze()
	testutil.Eventually(t, 30*time.Second, "the half-open tunnel's route is withdrawn", func() error {
		if _, err := r.Get(context.Background(), target); !errors.Is(err, registry.ErrNotFound) {
			return fmt.Errorf("route still there: %v", err)
		}
		return nil
	})
	testutil.Eventually(t, 30*time.Second, "no yamux session goroutine and no tunnel left", func() error {
		if n := yamuxGoroutines(); n > 0 {
			return fmt.Errorf("%d yamux session goroutines", n)
		}
		if n := gaugeValue(t, reg, "tether_ps_tunnels"); n != 0 {
			return fmt.Errorf("tunnels gauge %v", n)
		}
		return nil
	})
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

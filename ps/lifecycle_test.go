package ps_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
)

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
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) { c.Registerer = reg })
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
		if n := testutil.MetricValue(t, reg, "tether_ps_tunnels"); n != 0 {
			return fmt.Errorf("tunnels gauge %v", n)
		}
		return nil
	})
}

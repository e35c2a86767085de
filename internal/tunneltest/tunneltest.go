// Package tunneltest owns the helpers that tests of the tunnel, the agent
// and the commands share: a PS and an agent running in the test's process,
// identity servers that say who answered, and waits on the registry.
package tunneltest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testpki"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// LogBuf collects a daemon's log for assertions, and prints it when the
// test fails.
type LogBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LogBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns the log so far.
func (l *LogBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// NewLog returns a debug logger into a LogBuf, printed if t fails.
func NewLog(t testing.TB, name string) (*slog.Logger, *LogBuf) {
	lb := &LogBuf{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s log:\n%s", name, lb.String())
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// PSNode is a PS running in this process.
type PSNode struct {
	PS   *ps.PS
	Addr string // the tunnel listener
	Log  *LogBuf
	Stop func() // drains, as SIGTERM does
}

// Token is the credential test PS nodes accept by default and test agents
// present: any agent id, endpoints in AgentRange. Tests run with
// credentials, as production does, never --insecure.
const Token = "tether-test-token"

// AgentRange is the loopback range test agents expose endpoints in; PS
// nodes name it in --agent-cidrs, as loopback is refused unless named.
const AgentRange = "127.77.0.0/16"

// StartPS runs a PS on loopback until the test ends (or Stop), with
// mod applied to its config. By default it accepts Token for any agent id
// and endpoints in AgentRange.
func StartPS(t *testing.T, redisURL, id string, mod func(*ps.Config)) *PSNode {
	t.Helper()
	cfg := ps.DefaultConfig()
	cfg.ID = id
	cfg.Listen = "127.0.0.1:0"
	cfg.Advertise = []string{"127.0.0.1"}
	// sk_lookup attaches to the whole network namespace: only in one the
	// test binary created for itself (testutil.MainInPrivateNetns), never
	// the machine's.
	cfg.DataPlane = ps.DataPlaneListeners
	if testutil.InPrivateNetns() {
		cfg.DataPlane = ps.DataPlaneSKLookup
	}
	cfg.Redis = redisURL
	cfg.Ports = FreeRange(t, 20)
	cfg.TokenFile = WriteTokens(t, Token+" * "+AgentRange+"\n")
	cfg.AgentCIDRs = []string{AgentRange}
	cfg.DrainTimeout = 2 * time.Second
	cfg.PoolListen = "127.0.0.1:0"
	log, lb := NewLog(t, "ps "+id)
	cfg.Logger = log
	if mod != nil {
		mod(&cfg)
	}
	ps, err := ps.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ps.Run(ctx) }()
	actx, acancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer acancel()
	addr, err := ps.Addr(actx)
	if err != nil {
		t.Fatalf("ps %s did not start: %v\n%s", id, err, lb.String())
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("ps %s: %v", id, err)
			}
			_ = ps.Close()
		})
	}
	t.Cleanup(stop)
	return &PSNode{PS: ps, Addr: addr.String(), Log: lb, Stop: stop}
}

// FreeRange finds n consecutive ports that are free on 127.0.0.1 now. It
// looks below the kernel's ephemeral range (ip_local_port_range), where
// the thousands of connections a test suite makes (and their TIME_WAIT
// ports) never land, so a range found free stays free; each test process
// starts at its own offset so parallel packages rarely try the same ports.
func FreeRange(t testing.TB, n int) string {
	t.Helper()
	rangeMu.Lock()
	defer rangeMu.Unlock()
	lo, hi := rangeRegion()
	if nextRange < lo || nextRange+n > hi {
		nextRange = lo + (os.Getpid()*97)%max(1, hi-lo-n)
	}
	for tries := 0; tries < 200; tries++ {
		first := nextRange
		nextRange += n
		if nextRange+n > hi {
			nextRange = lo
		}
		if rangeFree(first, n) {
			return fmt.Sprintf("%d-%d", first, first+n-1)
		}
	}
	t.Fatalf("no %d free consecutive ports in %d-%d", n, lo, hi-1)
	return ""
}

var (
	rangeMu   sync.Mutex
	nextRange int
)

// rangeRegion is where FreeRange looks: from 10000 up to the start of the
// ephemeral port range (or 32768 when it cannot be read).
func rangeRegion() (lo, hi int) {
	lo, hi = 10000, 32768
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	var eph, ephHi int
	if _, err := fmt.Sscan(string(b), &eph, &ephHi); err == nil && eph > lo+1000 {
		hi = eph
	}
	return lo, hi
}

func rangeFree(first, n int) bool {
	for p := first; p < first+n; p++ {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		ln.Close()
	}
	return true
}

// StartAgent runs an agent in this process until the test ends or stop.
// It fails t at once when the agent cannot be created, so it must be called
// from the test's goroutine; other goroutines use RunAgent.
func StartAgent(t *testing.T, id, ip string, servers []string, expose []string, mod func(*agent.Config)) (*agent.Agent, *LogBuf, func()) {
	t.Helper()
	a, lb, stop, err := RunAgent(t, id, ip, servers, expose, mod)
	if err != nil {
		t.Fatal(err)
	}
	return a, lb, stop
}

// RunAgent is StartAgent for any goroutine: it reports a bad configuration
// as an error instead of failing t, so a test may start agents from
// goroutines of its own (t.Fatal works only on the test's goroutine).
func RunAgent(t testing.TB, id, ip string, servers []string, expose []string, mod func(*agent.Config)) (*agent.Agent, *LogBuf, func(), error) {
	cfg := agent.DefaultConfig()
	cfg.ID = id
	cfg.IP = ip
	cfg.Servers = servers
	cfg.Expose = expose
	cfg.Token = Token
	cfg.BackoffMin = 50 * time.Millisecond
	cfg.BackoffMax = 500 * time.Millisecond
	log, lb := NewLog(t, "agent "+id)
	cfg.Logger = log
	if mod != nil {
		mod(&cfg)
	}
	a, err := agent.New(cfg)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("agent %s: %w", id, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = a.Run(ctx); close(done) }()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done; _ = a.Close() }) }
	t.Cleanup(stop)
	return a, lb, stop, nil
}

// Serve runs handle for every connection to a new loopback listener until
// the test ends, and returns the listener's address; c is closed when
// handle returns.
func Serve(t testing.TB, handle func(c *net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().String()
}

// IdentityServer accepts connections and answers each with name, then
// closes: whoever connects learns which server it reached.
func IdentityServer(t testing.TB, name string) string {
	t.Helper()
	return Serve(t, func(c *net.TCPConn) {
		_, _ = io.WriteString(c, name)
	})
}

// Ask connects to addr and returns what the server says before closing.
func Ask(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// NewRegistry connects to the test's Redis, closed at cleanup.
func NewRegistry(t *testing.T, url string) *registry.Registry {
	reg, err := registry.New(registry.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return reg
}

// WaitBackends waits until target has exactly n live backends, on n
// distinct PS nodes, and returns them.
func WaitBackends(t *testing.T, reg *registry.Registry, target netip.AddrPort, n int) []registry.Backend {
	t.Helper()
	var out []registry.Backend
	testutil.Eventually(t, 15*time.Second, fmt.Sprintf("route %s with %d backends", target, n), func() error {
		rt, err := reg.Get(context.Background(), target)
		if n == 0 && errors.Is(err, registry.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		ps := map[string]bool{}
		for _, b := range rt.Backends {
			ps[b.PSID] = true
		}
		if len(rt.Backends) != n || len(ps) != n {
			return fmt.Errorf("%d backends on %d ps nodes: %+v", len(rt.Backends), len(ps), rt.Backends)
		}
		out = rt.Backends
		return nil
	})
	return out
}

// WriteTokens writes a token file and returns its path.
func WriteTokens(t testing.TB, lines string) string {
	p := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(p, []byte(lines), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// PKI is a throwaway CA with server and client certificates.
type PKI = testpki.PKI

// NewPKI writes a fresh PKI into a temporary directory.
func NewPKI(t testing.TB) *PKI { return testpki.NewPKI(t) }

// Handshake dials the PS at addr and runs h's handshake as an agent would,
// presenting Token when h has none. The caller closes the session it
// returns.
func Handshake(addr string, h *tunnel.Hello) (*tunnel.AgentSession, error) {
	if h.Token == "" {
		h.Token = Token
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	return tunnel.Handshake(context.Background(), c, h, tunnel.ClientConfig{Timeout: 5 * time.Second})
}

package agent_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/tunnel"
)

// poolPS is a PS speaking the pool contract with the tunnel package's own
// primitives: it grants a pool on the control channel and keeps the data
// connections the agent dials, so a test can pair, refuse or drop each one.
type poolPS struct {
	sess     chan *tunnel.PSSession
	key      tunnel.PoolKey
	grant    uint16      // the size granted; 0 refuses the join (mux)
	refuse   atomic.Bool // answer data connections with pool_refused
	joins    atomic.Int32
	dials    atomic.Int32  // data connections that reached the listener
	idle     chan net.Conn // data connections taken into the pool
	mu       sync.Mutex
	all      []net.Conn
	tunnels  string         // the tunnel listener's address
	poolAddr netip.AddrPort // the pool listener's
}

func (p *poolPS) LostTunnel(context.Context, *tunnel.LostTunnel) tunnel.Ack {
	return tunnel.Ack{Code: tunnel.CodeOK}
}
func (p *poolPS) Withdraw(context.Context) tunnel.Ack { return tunnel.Ack{Code: tunnel.CodeOK} }

func startPoolPS(t *testing.T, grant uint16) *poolPS {
	t.Helper()
	key, err := tunnel.NewPoolKey()
	if err != nil {
		t.Fatal(err)
	}
	p := &poolPS{sess: make(chan *tunnel.PSSession, 1), key: key, grant: grant, idle: make(chan net.Conn, 64)}
	poolLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { poolLn.Close() })
	poolAddr := poolLn.Addr().(*net.TCPAddr).AddrPort()
	go func() {
		for {
			c, err := poolLn.Accept()
			if err != nil {
				return
			}
			p.dials.Add(1)
			p.mu.Lock()
			p.all = append(p.all, c)
			p.mu.Unlock()
			t.Cleanup(func() { c.Close() })
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			k, err := tunnel.ReadDataOpening(c)
			if err != nil || k != p.key || p.refuse.Load() {
				_ = tunnel.AnswerData(c, tunnel.StreamStatus{Code: tunnel.StreamPoolRefused, Message: "unknown session"})
				c.Close()
				continue
			}
			_ = c.SetDeadline(time.Time{})
			if tunnel.AnswerData(c, tunnel.StreamStatus{Code: tunnel.StreamOK}) == nil {
				p.idle <- c
			}
		}
	}()
	p.poolAddr = poolAddr
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	p.tunnels = ln.Addr().String()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		hello, err := tunnel.ReadHello(c)
		if err != nil {
			c.Close()
			return
		}
		w := &tunnel.Welcome{PSID: "fake", PSAddr: netip.MustParseAddr("127.0.0.1")}
		for i := range hello.Endpoints {
			w.Endpoints = append(w.Endpoints, tunnel.EndpointResult{Port: uint16(30000 + i)})
		}
		if err := tunnel.WriteWelcome(c, w); err != nil {
			c.Close()
			return
		}
		_ = c.SetDeadline(time.Time{})
		s, err := tunnel.NewPSSession(c, nil, 0)
		if err != nil {
			c.Close()
			return
		}
		t.Cleanup(func() { s.Close() })
		ctl, err := s.OpenControl(2 * time.Second)
		if err == nil {
			go func() { _ = ctl.Serve(context.Background(), p) }()
		}
		p.sess <- s
	}()
	return p
}

func (p *poolPS) JoinPool(context.Context) (*tunnel.PoolGrant, tunnel.Ack) {
	p.joins.Add(1)
	if p.grant == 0 {
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "data path is mux"}
	}
	return &tunnel.PoolGrant{Key: p.key, Addr: p.poolAddr, Size: p.grant}, tunnel.Ack{}
}

// waitSession returns the tunnel session once the agent connected.
func (p *poolPS) waitSession(t *testing.T) *tunnel.PSSession {
	t.Helper()
	select {
	case s := <-p.sess:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("the agent never connected")
		return nil
	}
}

// takeIdle returns n data connections the agent dialed into the pool.
func (p *poolPS) takeIdle(t *testing.T, n int) []net.Conn {
	t.Helper()
	var out []net.Conn
	for range n {
		select {
		case c := <-p.idle:
			out = append(out, c)
		case <-time.After(5 * time.Second):
			t.Fatalf("the pool holds %d data connections, want %d", len(out), n)
		}
	}
	return out
}

func startPoolAgent(t *testing.T, p *poolPS, poolSize int, expose ...string) (*prometheus.Registry, *tunneltest.LogBuf) {
	t.Helper()
	reg := prometheus.NewRegistry()
	_, lb, _ := tunneltest.StartAgent(t, "a1", "127.0.0.1", []string{p.tunnels}, expose, func(c *agent.Config) {
		c.Tunnels = 1
		c.PoolSize = poolSize
		c.Registerer = reg
	})
	return reg, lb
}

// pairAndAsk pairs data connection c with a client for target, as the PS
// does, and returns what the agent's target answered.
func pairAndAsk(c net.Conn, target string) (string, error) {
	if err := tunnel.OpenData(c, tunnel.StreamHeader{Target: netip.MustParseAddrPort(target),
		Source: netip.MustParseAddrPort("198.18.0.9:40000")}, 5*time.Second); err != nil {
		return "", err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// The pool fills to min(--pool-size, grant), a client paired with a data
// connection reaches the exposed target and gets its answer, and the
// agent dials a replacement at once.
func TestPoolFillsCarriesAndRefills(t *testing.T) {
	p := startPoolPS(t, 5)
	srv := tunneltest.IdentityServer(t, "local")
	reg, _ := startPoolAgent(t, p, 3, "9100="+srv)
	p.waitSession(t)
	idle := p.takeIdle(t, 3)
	testutil.Eventually(t, 5*time.Second, "pool_idle gauge at 3", func() error {
		if v := testutil.MetricValue(t, reg, "tether_agent_pool_idle"); v != 3 {
			return errors.New("not yet")
		}
		return nil
	})
	select {
	case <-p.idle:
		t.Fatal("the agent keeps more than min(--pool-size 3, grant 5) idle data connections")
	case <-time.After(200 * time.Millisecond):
	}

	got, err := pairAndAsk(idle[0], "127.0.0.1:9100")
	if err != nil || got != "local" {
		t.Fatalf("a client over a data connection got %q, %v; want the agent's target", got, err)
	}
	refill := p.takeIdle(t, 1) // the replacement of the paired one
	if v := testutil.MetricValue(t, reg, "tether_agent_streams_total"); v != 1 {
		t.Errorf("streams_total %v after one pooled client, want 1", v)
	}
	if v := testutil.MetricValue(t, reg, "tether_agent_pool_dials_total", "result", "ok"); v != 4 {
		t.Errorf("pool_dials_total{ok} %v, want 4 (3 + 1 refill)", v)
	}
	// The refill carries the next client too.
	if got, err := pairAndAsk(refill[0], "127.0.0.1:9100"); err != nil || got != "local" {
		t.Fatalf("a client over the refilled connection got %q, %v", got, err)
	}
	if p.joins.Load() != 1 {
		t.Errorf("%d pool joins, want 1", p.joins.Load())
	}
}

// A data connection answers exactly as a stream: a target the agent does
// not expose is refused with not_exposed, a garbage header with
// bad_header, a dead local target with dial_refused; the other data
// connections are not disturbed.
func TestPoolRefusesAsStreamsDo(t *testing.T) {
	p := startPoolPS(t, 8)
	srv := tunneltest.IdentityServer(t, "local")
	dead := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)) // nothing listens here
	reg, _ := startPoolAgent(t, p, 4, "9100="+srv, "9200="+dead)
	p.waitSession(t)
	idle := p.takeIdle(t, 4)

	var se *tunnel.StreamError
	if _, err := pairAndAsk(idle[0], "127.0.0.2:9100"); !errors.As(err, &se) || se.Code != tunnel.StreamNotExposed {
		t.Fatalf("a target not exposed: got %v, want not_exposed", err)
	}
	if _, err := pairAndAsk(idle[1], "127.0.0.1:9200"); !errors.As(err, &se) || se.Code != tunnel.StreamDialRefused {
		t.Fatalf("a dead local target: got %v, want dial_refused", err)
	}
	// Garbage: a header that does not decode.
	c := idle[2]
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{tunnel.StreamVersion, 4, 9, 9, 9, 9}); err != nil {
		t.Fatal(err)
	}
	st, err := tunnel.ReadStreamStatus(c)
	if err != nil || st.Code != tunnel.StreamBadHeader {
		t.Fatalf("a garbage header: got %+v, %v; want bad_header", st, err)
	}
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("the refused data connection stayed open (%d bytes)", n)
	}
	if v := testutil.MetricValue(t, reg, "tether_agent_stream_errors_total", "reason", "bad_header"); v != 1 {
		t.Errorf("stream_errors_total{bad_header} = %v, want 1", v)
	}
	// Nothing else was disturbed: the last idle one and the refills carry
	// clients.
	if got, err := pairAndAsk(idle[3], "127.0.0.1:9100"); err != nil || got != "local" {
		t.Fatalf("an untouched data connection after the refusals: %q, %v", got, err)
	}
	for _, c := range p.takeIdle(t, 4) { // the refills of the four used ones
		if got, err := pairAndAsk(c, "127.0.0.1:9100"); err != nil || got != "local" {
			t.Fatalf("a refilled data connection: %q, %v", got, err)
		}
	}
}

// When the tunnel session ends, the agent closes its data connections at
// once and dials no more for that session.
func TestPoolClosesWithItsTunnel(t *testing.T) {
	p := startPoolPS(t, 8)
	srv := tunneltest.IdentityServer(t, "local")
	reg, _ := startPoolAgent(t, p, 3, "9100="+srv)
	s := p.waitSession(t)
	idle := p.takeIdle(t, 3)
	dialsBefore := p.dials.Load()
	start := time.Now()
	_ = s.Close()
	for i, c := range idle {
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Fatalf("data connection %d after the tunnel closed: %v, want it closed by the agent", i, err)
		}
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("data connections closed %v after the tunnel, want at once", took)
	}
	time.Sleep(300 * time.Millisecond)
	if d := p.dials.Load(); d != dialsBefore {
		t.Errorf("%d data connections dialed after the tunnel ended", d-dialsBefore)
	}
	if v := testutil.MetricValue(t, reg, "tether_agent_pool_idle"); v != 0 {
		t.Errorf("pool_idle %v after the tunnel ended, want 0", v)
	}
}

// A draining agent closes its idle data connections at once (the PS then
// carries the clients of the drain's settle on the tunnel), before the
// tunnel itself closes.
func TestPoolClosesWhenTheAgentDrains(t *testing.T) {
	p := startPoolPS(t, 8)
	srv := tunneltest.IdentityServer(t, "local")
	reg := prometheus.NewRegistry()
	_, _, stop := tunneltest.StartAgent(t, "a1", "127.0.0.1", []string{p.tunnels}, []string{"9100=" + srv}, func(c *agent.Config) {
		c.Tunnels, c.PoolSize, c.Registerer = 1, 3, reg
	})
	s := p.waitSession(t)
	idle := p.takeIdle(t, 3)
	start := time.Now()
	go stop()
	for i, c := range idle {
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Fatalf("data connection %d during the drain: %v, want it closed", i, err)
		}
	}
	took := time.Since(start)
	select {
	case <-s.Done():
		t.Fatalf("the tunnel closed before the data connections were (after %v): the pool was not closed at the drain's start", took)
	default:
	}
	if took > 250*time.Millisecond {
		t.Errorf("idle data connections closed %v into the drain, want at its start", took)
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// A PS that answers pool_refused (it does not know the session) stops the
// pool: the agent stops dialing, and the tunnel's streams still work.
func TestPoolRefusedStopsThePool(t *testing.T) {
	p := startPoolPS(t, 8)
	p.refuse.Store(true)
	srv := tunneltest.IdentityServer(t, "local")
	reg, lb := startPoolAgent(t, p, 4, "9100="+srv)
	s := p.waitSession(t)
	testutil.Eventually(t, 5*time.Second, "a refused dial", func() error {
		if testutil.MetricValue(t, reg, "tether_agent_pool_dials_total", "result", "refused") == 0 {
			return errors.New("none yet")
		}
		return nil
	})
	time.Sleep(300 * time.Millisecond)
	d := p.dials.Load()
	time.Sleep(500 * time.Millisecond)
	if p.dials.Load() != d || d > 4 {
		t.Fatalf("the agent kept dialing after pool_refused: %d dials, then %d", d, p.dials.Load())
	}
	if !strings.Contains(lb.String(), "refused a data connection") {
		t.Error("the agent did not log why its pool stopped")
	}
	if v := testutil.MetricValue(t, reg, "tether_agent_pool_idle"); v != 0 {
		t.Errorf("pool_idle %v, want 0", v)
	}
	st, err := s.Open(tunnel.StreamHeader{Target: netip.MustParseAddrPort("127.0.0.1:9100")}, 5*time.Second)
	if err != nil {
		t.Fatalf("the tunnel after the pool stopped: %v", err)
	}
	defer st.Close()
	if b, _ := io.ReadAll(st); string(b) != "local" {
		t.Fatalf("a stream after the pool stopped: %q", b)
	}
}

// --pool-size 0 never joins; a PS that refuses the join (mux) gets no
// data connection either.
func TestNoPoolWithoutSizeOrGrant(t *testing.T) {
	for _, tc := range []struct {
		name  string
		size  int
		grant uint16
		joins int32
	}{{"pool-size 0", 0, 8, 0}, {"ps is mux", 4, 0, 1}} {
		t.Run(tc.name, func(t *testing.T) {
			p := startPoolPS(t, tc.grant)
			srv := tunneltest.IdentityServer(t, "local")
			startPoolAgent(t, p, tc.size, "9100="+srv)
			s := p.waitSession(t)
			// The control channel works (a stream round trip proves the
			// session is served), then give a join time to happen.
			st, err := s.Open(tunnel.StreamHeader{Target: netip.MustParseAddrPort("127.0.0.1:9100")}, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.ReadAll(st)
			st.Close()
			time.Sleep(300 * time.Millisecond)
			if j := p.joins.Load(); j != tc.joins {
				t.Errorf("%d pool joins, want %d", j, tc.joins)
			}
			if d := p.dials.Load(); d != 0 {
				t.Errorf("%d data connections dialed, want none", d)
			}
		})
	}
}

// Against a real PS (plain TCP, and TLS with client certificates): the
// agent joins the PS's pool, client connections to the PS port are carried
// over data connections (the PS counts them on the pool path) and answered
// by the agent's target, and the pool refills after each one.
func TestPoolWithARealPS(t *testing.T) {
	rd := testutil.StartRedis(t)
	pki := tunneltest.NewPKI(t)
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"tcp", false}, {"tls", true}} {
		t.Run(tc.name, func(t *testing.T) {
			psReg := prometheus.NewRegistry()
			node := tunneltest.StartPS(t, rd.URL(), "ps-"+tc.name, func(c *ps.Config) {
				c.PoolListen = "127.0.0.1:0"
				c.DataPath = ps.DataPathPool
				c.PoolWait = 2 * time.Second // the test asserts the pool path: never fall back
				c.Registerer = psReg
				if tc.tls {
					c.TLSCert, c.TLSKey, c.TLSCA = pki.ServerCert, pki.ServerKey, pki.CA
				}
			})
			reg := prometheus.NewRegistry()
			srv := tunneltest.IdentityServer(t, "pooled-"+tc.name)
			id, ip := "a-"+tc.name, "127.77.0.21"
			if tc.tls {
				id, ip = "agent", "127.77.0.22" // the test PKI's client certificate speaks for "agent"
			}
			tunneltest.StartAgent(t, id, ip, []string{node.Addr}, []string{"9100=" + srv}, func(c *agent.Config) {
				c.Tunnels = 1
				c.PoolSize = 2
				c.Registerer = reg
				if tc.tls {
					c.TLSCert, c.TLSKey, c.TLSCA = pki.ClientCert, pki.ClientKey, pki.CA
				}
			})
			r := tunneltest.NewRegistry(t, rd.URL())
			be := tunneltest.WaitBackends(t, r, netip.MustParseAddrPort(ip+":9100"), 1)[0]
			testutil.Eventually(t, 5*time.Second, "the agent's pool full", func() error {
				if v := testutil.MetricValue(t, reg, "tether_agent_pool_idle"); v != 2 {
					return fmt.Errorf("pool_idle %v", v)
				}
				return nil
			})
			for i := range 5 {
				if got, err := tunneltest.Ask(be.Address.String()); err != nil || got != "pooled-"+tc.name {
					t.Fatalf("client %d through the PS: %q, %v", i, got, err)
				}
			}
			if v := testutil.MetricValue(t, psReg, "tether_ps_data_path_total", "path", "pool"); v != 5 {
				t.Errorf("the PS carried %v clients on the pool path, want 5 (mux: %v)", v,
					testutil.MetricValue(t, psReg, "tether_ps_data_path_total", "path", "mux"))
			}
			testutil.Eventually(t, 5*time.Second, "the pool refilled", func() error {
				ok := testutil.MetricValue(t, reg, "tether_agent_pool_dials_total", "result", "ok")
				if idle := testutil.MetricValue(t, reg, "tether_agent_pool_idle"); idle != 2 || ok != 7 {
					return fmt.Errorf("pool_idle %v, dials ok %v; want 2 and 7", idle, ok)
				}
				return nil
			})
			if v := testutil.MetricValue(t, reg, "tether_agent_streams_total"); v != 5 {
				t.Errorf("agent streams_total %v, want 5", v)
			}
		})
	}
}

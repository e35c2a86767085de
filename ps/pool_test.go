package ps_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/relay"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/tunnel"
)

// startPoolPS starts a PS whose pool listener is on a free loopback port.
func startPoolPS(t *testing.T, redisURL string, mod func(*ps.Config)) (*tunneltest.PSNode, *prometheus.Registry) {
	t.Helper()
	metrics := prometheus.NewRegistry()
	node := tunneltest.StartPS(t, redisURL, "ps-pool", func(c *ps.Config) {
		c.Registerer = metrics
		c.PoolListen = "127.0.0.1:0"
		c.PreambleTimeout = 700 * time.Millisecond
		if mod != nil {
			mod(c)
		}
	})
	return node, metrics
}

// metricValue reads one series of a counter or gauge (labels as
// name=value pairs), 0 when absent.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !hasLabel(m, labels[i], labels[i+1]) {
					continue series
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

func waitMetric(t *testing.T, reg *prometheus.Registry, want float64, name string, labels ...string) {
	t.Helper()
	testutil.Eventually(t, 5*time.Second, fmt.Sprintf("%s%v = %v", name, labels, want), func() error {
		if got := metricValue(t, reg, name, labels...); got != want {
			return fmt.Errorf("%v", got)
		}
		return nil
	})
}

// poolAgent is a fake agent speaking the pool contract: a tunnel whose
// streams go to muxSrv, and data connections it dials itself, each
// carried to poolSrv.
type poolAgent struct {
	sess  *tunnel.AgentSession
	grant *tunnel.PoolGrant
	port  uint16 // the endpoint's port on the PS
	tls   *tls.Config
}

func startPoolAgent(t *testing.T, sess *tunnel.AgentSession, muxSrv string) *poolAgent {
	t.Helper()
	t.Cleanup(func() { sess.Close() })
	go func() {
		for {
			in, err := sess.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				if _, err := in.ReadHeader(time.Second); err != nil {
					return // the control channel, taken by the session
				}
				up, err := net.Dial("tcp", muxSrv)
				if err != nil {
					_ = in.Reject(tunnel.StreamDialRefused, err.Error())
					return
				}
				st, err := in.Accept()
				if err != nil {
					_ = up.Close()
					return
				}
				_, _, _ = relay.Join(st, up.(*net.TCPConn), nil, nil)
			}()
		}
	}()
	testutil.Eventually(t, 5*time.Second, "control channel", func() error {
		if sess.Control() == nil {
			return errors.New("not open")
		}
		return nil
	})
	a := &poolAgent{sess: sess, port: sess.Welcome.Endpoints[0].Port, tls: sess.TLSConfig()}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	g, err := sess.Control().JoinPool(ctx)
	if err != nil {
		t.Fatalf("join pool: %v", err)
	}
	a.grant = g
	return a
}

// dial opens one data connection with key (the grant's when zero).
func (a *poolAgent) dial(key tunnel.PoolKey) (*tunnel.DataConn, error) {
	if key == (tunnel.PoolKey{}) {
		key = a.grant.Key
	}
	return tunnel.DialData(context.Background(), a.grant.Addr, key, tunnel.ClientConfig{TLS: a.tls, Timeout: 3 * time.Second})
}

// serve dials a data connection that carries its client to srv; served is
// incremented once it has.
func (a *poolAgent) serve(t *testing.T, srv string, served *atomic.Int64) *tunnel.DataConn {
	t.Helper()
	dc, err := a.dial(tunnel.PoolKey{})
	if err != nil {
		t.Fatalf("dial data connection: %v", err)
	}
	t.Cleanup(func() { dc.Close() })
	go func() {
		if _, err := dc.ReadHeader(); err != nil {
			return
		}
		up, err := net.Dial("tcp", srv)
		if err != nil {
			_ = dc.Reject(tunnel.StreamDialRefused, err.Error())
			return
		}
		c, err := dc.Accept()
		if err != nil {
			return
		}
		_, _, _ = relay.Splice(c, up, relay.Options{})
		if served != nil {
			served.Add(1)
		}
	}()
	return dc
}

func (a *poolAgent) client() string { return fmt.Sprintf("127.0.0.1:%d", a.port) }

func plainAgent(t *testing.T, psAddr, id, target string) *tunnel.AgentSession {
	t.Helper()
	ep := netip.MustParseAddrPort(target)
	s, err := tunneltest.Handshake(psAddr, &tunnel.Hello{AgentID: id, AgentIP: ep.Addr(), Epoch: 1, Endpoints: []netip.AddrPort{ep}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A client connection goes over an idle data connection when there is one
// (path=pool, answered by the pool's server), and over the tunnel at once
// when the pool is empty (--data-path auto).
func TestPooledDataConnectionCarriesTheClient(t *testing.T) {
	rd := testutil.StartRedis(t)
	node, metrics := startPoolPS(t, rd.URL(), nil)
	muxSrv, poolSrv := tunneltest.IdentityServer(t, "via-mux"), tunneltest.IdentityServer(t, "via-pool")
	a := startPoolAgent(t, plainAgent(t, node.Addr, "a1", "127.77.6.1:9100"), muxSrv)
	if a.grant.Size != 16 || a.grant.Addr.Port() == 0 || !a.grant.Addr.Addr().IsLoopback() {
		t.Fatalf("grant %+v: want size 16 and the loopback pool listener", a.grant)
	}
	var served atomic.Int64
	a.serve(t, poolSrv, &served)
	a.serve(t, poolSrv, &served)
	waitMetric(t, metrics, 2, "tether_ps_pool_idle")
	for i := range 2 {
		if got, err := tunneltest.Ask(a.client()); err != nil || got != "via-pool" {
			t.Fatalf("client %d: %q, %v; want via-pool", i, got, err)
		}
	}
	waitMetric(t, metrics, 2, "tether_ps_data_path_total", "path", "pool")
	waitMetric(t, metrics, 0, "tether_ps_pool_idle")
	// The pool is empty: the tunnel carries the next one at once.
	if got, err := tunneltest.Ask(a.client()); err != nil || got != "via-mux" {
		t.Fatalf("client with an empty pool: %q, %v; want via-mux", got, err)
	}
	waitMetric(t, metrics, 1, "tether_ps_data_path_total", "path", "mux")
	waitMetric(t, metrics, 3, "tether_ps_streams_total")
	if served.Load() != 2 {
		t.Fatalf("the agent's data connections carried %d clients, want 2", served.Load())
	}
}

// A data connection that dies before its status (the agent went away
// after the PS sent the header) is dropped and the next one carries the
// client, who sees nothing of it; one the agent closes while idle leaves
// the pool at once.
func TestStalePooledConnectionIsRetried(t *testing.T) {
	rd := testutil.StartRedis(t)
	node, metrics := startPoolPS(t, rd.URL(), func(c *ps.Config) { c.DataPath = ps.DataPathPool })
	a := startPoolAgent(t, plainAgent(t, node.Addr, "a1", "127.77.6.2:9100"), tunneltest.IdentityServer(t, "via-mux"))
	var served atomic.Int64
	a.serve(t, tunneltest.IdentityServer(t, "via-pool"), &served)
	waitMetric(t, metrics, 1, "tether_ps_pool_idle")
	// The newest is paired first: this one reads the header and dies.
	stale, err := a.dial(tunnel.PoolKey{})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = stale.ReadHeader()
		_ = stale.Close()
	}()
	waitMetric(t, metrics, 2, "tether_ps_pool_idle")
	if got, err := tunneltest.Ask(a.client()); err != nil || got != "via-pool" {
		t.Fatalf("client: %q, %v; want via-pool through the second data connection", got, err)
	}
	waitMetric(t, metrics, 1, "tether_ps_pool_stale_total")
	waitMetric(t, metrics, 1, "tether_ps_data_path_total", "path", "pool")

	// Closed while idle: it leaves the pool without a client's help.
	idle, err := a.dial(tunnel.PoolKey{})
	if err != nil {
		t.Fatal(err)
	}
	waitMetric(t, metrics, 1, "tether_ps_pool_idle")
	_ = idle.Close()
	waitMetric(t, metrics, 0, "tether_ps_pool_idle")
	// --data-path pool with nothing idle waits --pool-wait, then the tunnel.
	if got, err := tunneltest.Ask(a.client()); err != nil || got != "via-mux" {
		t.Fatalf("client with no idle data connection: %q, %v; want via-mux", got, err)
	}
	if served.Load() != 1 {
		t.Fatalf("served %d, want 1", served.Load())
	}
}

// The pool listener refuses what is not a data connection of a live
// session: an unknown key, a bad version, garbage, a slow opening, a huge
// one, one too many for the pool; meanwhile a pooled client connection
// keeps working.
func TestPoolListenerRefusesBadInput(t *testing.T) {
	rd := testutil.StartRedis(t)
	node, metrics := startPoolPS(t, rd.URL(), func(c *ps.Config) { c.PoolSize = 2 })
	a := startPoolAgent(t, plainAgent(t, node.Addr, "a1", "127.77.6.3:9100"), tunneltest.IdentityServer(t, "via-mux"))
	if a.grant.Size != 2 {
		t.Fatalf("grant size %d, want --pool-size 2", a.grant.Size)
	}
	poolSrv := tunneltest.IdentityServer(t, "via-pool")
	var served atomic.Int64
	a.serve(t, poolSrv, &served)

	var unknown tunnel.PoolKey
	unknown[0] = 1
	_, err := a.dial(unknown)
	var se *tunnel.StreamError
	if !errors.As(err, &se) || se.Code != tunnel.StreamPoolRefused {
		t.Fatalf("unknown key: %v, want pool_refused", err)
	}
	raw := func(b []byte) ([]byte, error) {
		c, err := net.Dial("tcp", a.grant.Addr.String())
		if err != nil {
			return nil, err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		return io.ReadAll(c)
	}
	opening := append(append(tunnel.DataMagic[:], 9), a.grant.Key[:]...)
	if got, err := raw(opening); err != nil || len(got) < 2 || tunnel.StreamCode(got[0]) != tunnel.StreamVersionErr {
		t.Fatalf("bad version: answer %q, %v; want unsupported_version", got, err)
	}
	// Garbage and a megabyte of junk are closed without an answer (a
	// reset, since the junk is left unread), at once: not by the test's
	// own read deadline.
	for name, junk := range map[string][]byte{"garbage": []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "huge": make([]byte, 1<<20)} {
		if got, err := raw(junk); len(got) != 0 || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%s: answer %q, %v; want a close without an answer", name, got, err)
		}
	}
	// Slowloris: half an opening, then silence, is closed after
	// --preamble-timeout.
	slow, err := net.Dial("tcp", a.grant.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	_, _ = slow.Write(tunnel.DataMagic[:2])
	start := time.Now()
	_ = slow.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := slow.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("slow opening: read %d, %v; want the PS to close it", n, err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("slow opening closed after %v, want about --preamble-timeout", took)
	}
	// A full pool refuses one more.
	a.serve(t, poolSrv, &served)
	waitMetric(t, metrics, 2, "tether_ps_pool_idle")
	if _, err := a.dial(tunnel.PoolKey{}); !errors.As(err, &se) || se.Code != tunnel.StreamPoolRefused {
		t.Fatalf("a third data connection for a pool of 2: %v, want pool_refused", err)
	}
	if got := metricValue(t, metrics, "tether_ps_pool_conns_total", "result", "refused"); got < 6 {
		t.Fatalf("pool_conns_total{refused} = %v, want at least 6", got)
	}
	// The good ones still carry clients.
	if got, err := tunneltest.Ask(a.client()); err != nil || got != "via-pool" {
		t.Fatalf("client after the bad input: %q, %v; want via-pool", got, err)
	}
}

// When the session ends, its pool goes: the idle data connections are
// closed (the agent's ReadHeader returns) and its key is refused.
func TestPoolIsEmptiedWhenTheSessionEnds(t *testing.T) {
	rd := testutil.StartRedis(t)
	node, metrics := startPoolPS(t, rd.URL(), nil)
	a := startPoolAgent(t, plainAgent(t, node.Addr, "a1", "127.77.6.4:9100"), tunneltest.IdentityServer(t, "via-mux"))
	dc, err := a.dial(tunnel.PoolKey{})
	if err != nil {
		t.Fatal(err)
	}
	waitMetric(t, metrics, 1, "tether_ps_pool_idle")
	ended := make(chan error, 1)
	go func() { _, err := dc.ReadHeader(); ended <- err }()
	_ = a.sess.Close()
	select {
	case err := <-ended:
		if err == nil {
			t.Fatal("an idle data connection got a header after its session ended")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the idle data connection is still open 5 s after its session ended")
	}
	waitMetric(t, metrics, 0, "tether_ps_pool_idle")
	var se *tunnel.StreamError
	if _, err := a.dial(tunnel.PoolKey{}); !errors.As(err, &se) || se.Code != tunnel.StreamPoolRefused {
		t.Fatalf("the ended session's key: %v, want pool_refused", err)
	}
}

// With client certificates, a data connection must come from the
// session's agent: another agent's certificate with a leaked key is
// refused.
func TestDataConnectionOfAnotherAgentIsRefused(t *testing.T) {
	rd := testutil.StartRedis(t)
	pk := tunneltest.NewPKI(t)
	node, _ := startPoolPS(t, rd.URL(), func(c *ps.Config) {
		c.TLSCert, c.TLSKey, c.TLSCA = pk.ServerCert, pk.ServerKey, pk.CA
		c.DataPath = ps.DataPathPool // auto does not pool under TLS (see TestAutoDoesNotPoolUnderTLS)
	})
	agentTLS := func(id string) *tls.Config {
		cert, key := pk.Agent(t, id)
		cfg, err := tunnel.ClientTLSConfig(tunnel.TLSFiles{Cert: cert, Key: key, CA: pk.CA}, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	ep := netip.MustParseAddrPort("127.77.6.5:9100")
	c, err := net.Dial("tcp", node.Addr)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := tunnel.Handshake(context.Background(), c, &tunnel.Hello{AgentID: "a1", AgentIP: ep.Addr(), Epoch: 1, Endpoints: []netip.AddrPort{ep}, Token: tunneltest.Token},
		tunnel.ClientConfig{TLS: agentTLS("a1"), Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	a := startPoolAgent(t, sess, tunneltest.IdentityServer(t, "via-mux"))
	// The session's own agent joins; another agent with the key does not.
	var served atomic.Int64
	a.serve(t, tunneltest.IdentityServer(t, "via-pool"), &served)
	a.tls = agentTLS("a2")
	var se *tunnel.StreamError
	if _, err := a.dial(tunnel.PoolKey{}); !errors.As(err, &se) || se.Code != tunnel.StreamPoolRefused || !strings.Contains(se.Message, "a2") {
		t.Fatalf("a2's data connection for a1's session: %v, want pool_refused naming a2", err)
	}
	if got, err := tunneltest.Ask(a.client()); err != nil || got != "via-pool" {
		t.Fatalf("client over TLS data connection: %q, %v; want via-pool", got, err)
	}
}

// --data-path mux offers no pool: the join is refused and no pool listener
// is opened; clients use the tunnel as before.
func TestMuxDataPathNeverGrants(t *testing.T) {
	rd := testutil.StartRedis(t)
	node, metrics := startPoolPS(t, rd.URL(), func(c *ps.Config) { c.DataPath = ps.DataPathMux })
	sess := plainAgent(t, node.Addr, "a1", "127.77.6.6:9100")
	defer sess.Close()
	muxSrv := tunneltest.IdentityServer(t, "via-mux")
	go func() {
		for {
			in, err := sess.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				if _, err := in.ReadHeader(time.Second); err != nil {
					return
				}
				up, _ := net.Dial("tcp", muxSrv)
				st, _ := in.Accept()
				_, _, _ = relay.Join(st, up.(*net.TCPConn), nil, nil)
			}()
		}
	}()
	testutil.Eventually(t, 5*time.Second, "control channel", func() error {
		if sess.Control() == nil {
			return errors.New("not open")
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	g, err := sess.Control().JoinPool(ctx)
	if !errors.Is(err, tunnel.ErrNoPool) || g != nil || !strings.Contains(err.Error(), "data path is mux") {
		t.Fatalf("join with --data-path mux: %+v, %v; want ErrNoPool \"data path is mux\"", g, err)
	}
	if got, err := tunneltest.Ask(fmt.Sprintf("127.0.0.1:%d", sess.Welcome.Endpoints[0].Port)); err != nil || got != "via-mux" {
		t.Fatalf("client: %q, %v", got, err)
	}
	waitMetric(t, metrics, 1, "tether_ps_data_path_total", "path", "mux")
	waitMetric(t, metrics, 0, "tether_ps_data_path_total", "path", "pool")
}

// The real agent joins the pool and carries clients over it.
func TestRealAgentUsesThePool(t *testing.T) {
	rd := testutil.StartRedis(t)
	node, metrics := startPoolPS(t, rd.URL(), nil)
	srv := tunneltest.IdentityServer(t, "agent-a1")
	tunneltest.StartAgent(t, "a1", "127.77.6.7", []string{node.Addr}, []string{"9100=" + srv}, func(c *agent.Config) {
		c.Tunnels = 1
		c.PoolSize = 4
	})
	reg := tunneltest.NewRegistry(t, rd.URL())
	bs := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort("127.77.6.7:9100"), 1)
	waitMetric(t, metrics, 4, "tether_ps_pool_idle")
	for i := range 10 {
		if got, err := tunneltest.Ask(bs[0].Address.String()); err != nil || got != "agent-a1" {
			t.Fatalf("client %d: %q, %v", i, got, err)
		}
	}
	waitMetric(t, metrics, 10, "tether_ps_data_path_total", "path", "pool")
	// The agent refills the pool ahead of demand.
	waitMetric(t, metrics, 4, "tether_ps_pool_idle")
}

// --data-path auto pools only plain tunnels: under TLS a pooled connection
// costs a handshake per client connection and copies in user space like
// the tunnel (test/bench/paths), so the join is refused with the reason.
func TestAutoDoesNotPoolUnderTLS(t *testing.T) {
	rd := testutil.StartRedis(t)
	pk := tunneltest.NewPKI(t)
	node, _ := startPoolPS(t, rd.URL(), func(c *ps.Config) {
		c.TLSCert, c.TLSKey, c.TLSCA = pk.ServerCert, pk.ServerKey, pk.CA
		c.DataPath = ps.DataPathAuto
	})
	cert, key := pk.Agent(t, "a1")
	cfg, err := tunnel.ClientTLSConfig(tunnel.TLSFiles{Cert: cert, Key: key, CA: pk.CA}, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ep := netip.MustParseAddrPort("127.77.6.7:9100")
	c, err := net.Dial("tcp", node.Addr)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := tunnel.Handshake(context.Background(), c, &tunnel.Hello{AgentID: "a1", AgentIP: ep.Addr(), Epoch: 1, Endpoints: []netip.AddrPort{ep}, Token: tunneltest.Token},
		tunnel.ClientConfig{TLS: cfg, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	go func() {
		for {
			in, err := sess.Accept(context.Background())
			if err != nil {
				return
			}
			// ReadHeader takes the control stream over; others are not
			// this test's business.
			if _, err := in.ReadHeader(time.Second); err == nil {
				in.Abort()
			}
		}
	}()
	testutil.Eventually(t, 5*time.Second, "control channel", func() error {
		if sess.Control() == nil {
			return errors.New("not open")
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	g, err := sess.Control().JoinPool(ctx)
	if !errors.Is(err, tunnel.ErrNoPool) || g != nil || !strings.Contains(err.Error(), "under TLS") {
		t.Fatalf("join with --data-path auto under TLS: %+v, %v; want ErrNoPool naming TLS", g, err)
	}
}

package hostile

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

var tetherBin string

// The suite runs in a network namespace of its own (root): its PS nodes use
// the sk_lookup data plane by default, which attaches to the whole
// namespace, never to be the machine's.
func TestMain(m *testing.M) {
	os.Exit(testutil.MainInPrivateNetns(func() int {
		flag.Parse()
		if testing.Short() {
			// The suite runs real processes; -short (make test-unit) skips it.
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "tether-hostile")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		tetherBin, err = testutil.BuildTether(dir)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return m.Run()
	}))
}

func skipShort(t *testing.T) {
	if testing.Short() {
		t.Skip("the hostile-peer suite runs real processes; skipped under -short")
	}
}

// The credentials of the suite: each line is one party. The victim's token
// may act only as a1 and expose only its own address; the others are the
// attackers and a bystander.
const tokens = `victim-token a1 127.77.0.1/32
rival-token * 127.77.0.0/16
narrow-token n* 127.77.5.0/24
source-token s*
greedy-token g1 127.77.0.0/16
bystander-token b1 127.77.2.0/24
`

// The victim: agent a1 on 127.77.0.1, exposing an identity service on
// 9100 and a silent one on 9200, through ps1 and ps2.
var (
	victimTarget = netip.MustParseAddrPort("127.77.0.1:9100")
	silentTarget = netip.MustParseAddrPort("127.77.0.1:9200")
)

type psNode struct {
	*testutil.Proc
	id, listen, advertise, metrics string
}

type world struct {
	t      *testing.T
	rd     *testutil.Redis
	reg    *registry.Registry
	tokens string
	ps     map[string]*psNode
	ports  int // data ports per PS
}

func newWorld(t *testing.T) *world {
	w := &world{t: t, rd: testutil.StartRedis(t), tokens: tunneltest.WriteTokens(t, tokens), ps: map[string]*psNode{}, ports: 200}
	w.reg = tunneltest.NewRegistry(t, w.rd.URL())
	for i, id := range []string{"ps1", "ps2", "ps3"} {
		w.startPS(id, fmt.Sprintf("127.77.0.%d", 200+i))
	}
	return w
}

func (w *world) startPS(id, advertise string) *psNode {
	t := w.t
	n := &psNode{id: id, advertise: advertise,
		listen:  fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)),
		metrics: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))}
	n.Proc = testutil.StartProc(t, id, nil, tetherBin, "ps", "--id", id, "--listen", n.listen, "--advertise", advertise,
		"--ports", tunneltest.FreeRange(t, w.ports), "--redis", w.rd.URL(), "--token-file", w.tokens,
		"--agent-cidrs", "127.77.0.0/16", "--metrics", n.metrics, "--lease", "2s", "--renew", "500ms", "--drain-timeout", "2s")
	testutil.WaitTCP(t, n.listen, 10*time.Second)
	w.ps[id] = n
	return n
}

// startVictim runs agent a1 with tunnels on ps1 and ps2 and waits for both
// backends of its targets.
func (w *world) startVictim() {
	t := w.t
	id := tunneltest.IdentityServer(t, "agent-a1")
	silent := tunneltest.Serve(t, func(c *net.TCPConn) { _, _ = io.Copy(io.Discard, c) })
	testutil.StartProc(t, "agent a1", []string{cliconfig.TokenEnv + "=victim-token"}, tetherBin, "agent", "--id", "a1",
		"--ip", "127.77.0.1", "--expose", "9100="+id, "--expose", "9200="+silent,
		"--server", w.ps["ps1"].listen, "--server", w.ps["ps2"].listen, "--tunnels", "2")
	tunneltest.WaitBackends(t, w.reg, victimTarget, 2)
	tunneltest.WaitBackends(t, w.reg, silentTarget, 2)
}

// loop is the legitimate client: it asks every backend of the victim's
// target, over and over, and counts failures and wrong answers.
type loop struct {
	ok, failed, wrong atomic.Int64
	mu                sync.Mutex
	errs              []string
	stop              chan struct{}
	done              chan struct{}
}

func (w *world) startLoop() *loop {
	l := &loop{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			l.round(w.reg)
		}
	}()
	w.t.Cleanup(l.end)
	return l
}

func (l *loop) end() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
}

func (l *loop) fail(counter *atomic.Int64, format string, args ...any) {
	counter.Add(1)
	l.mu.Lock()
	if len(l.errs) < 10 {
		l.errs = append(l.errs, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
	}
	l.mu.Unlock()
}

func (l *loop) round(reg *registry.Registry) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rt, err := reg.Get(ctx, victimTarget)
	if err != nil {
		l.fail(&l.failed, "route: %v", err)
		return
	}
	live := 0
	for _, b := range rt.Backends {
		if b.AgentID != "a1" {
			l.fail(&l.wrong, "backend %s on %s belongs to %q", b.Address, b.PSID, b.AgentID)
			continue
		}
		if !b.Live(time.Now()) {
			continue
		}
		live++
		got, err := tunneltest.Ask(b.Address.String())
		switch {
		case err != nil:
			l.fail(&l.failed, "ask %s (%s): %v", b.Address, b.PSID, err)
		case got != "agent-a1":
			l.fail(&l.wrong, "%s (%s) answered %q", b.Address, b.PSID, got)
		default:
			l.ok.Add(1)
		}
	}
	if live == 0 {
		l.fail(&l.failed, "no live backend")
	}
}

// clean fails t when the loop saw any failure or wrong answer, or made no
// progress since okBefore.
func (l *loop) clean(t *testing.T, okBefore int64) {
	t.Helper()
	l.mu.Lock()
	errs := strings.Join(l.errs, "\n")
	l.mu.Unlock()
	if f, wr := l.failed.Load(), l.wrong.Load(); f != 0 || wr != 0 {
		t.Fatalf("the victim's client loop saw %d failures and %d wrong answers:\n%s", f, wr, errs)
	}
	testutil.Eventually(t, 10*time.Second, "the victim's client loop makes progress", func() error {
		if l.ok.Load() <= okBefore {
			return errors.New("no successful request since the case started")
		}
		return nil
	})
}

// hello runs a raw handshake from local (empty = any) and returns the
// session or the refusal.
func hello(t *testing.T, psAddr, local string, h *tunnel.Hello) (*tunnel.AgentSession, error) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	c, err := d.Dial("tcp", psAddr)
	if err != nil {
		t.Fatalf("dial %s: %v", psAddr, err)
	}
	if h.Epoch == 0 {
		h.Epoch = uint64(time.Now().UnixNano())
	}
	return tunnel.Handshake(context.Background(), c, h, tunnel.ClientConfig{Timeout: 10 * time.Second})
}

func eps(s ...string) []netip.AddrPort {
	out := make([]netip.AddrPort, len(s))
	for i, e := range s {
		out[i] = netip.MustParseAddrPort(e)
	}
	return out
}

// refusedWith fails t unless err is a Refuse with code whose reason says says.
func refusedWith(t *testing.T, err error, code tunnel.Code, says string) {
	t.Helper()
	var rf *tunnel.Refuse
	if !errors.As(err, &rf) || rf.Code != code || !strings.Contains(rf.Reason, says) {
		t.Fatalf("got %v, want a %s refusal saying %q", err, code, says)
	}
	t.Logf("refused: %s: %s", rf.Code, rf.Reason)
}

// TestHostilePeers runs every attack of issue 9 against real PS processes
// while the victim's clients keep working.
func TestHostilePeers(t *testing.T) {
	skipShort(t)
	w := newWorld(t)
	w.startVictim()
	l := w.startLoop()
	ps1, ps3 := w.ps["ps1"], w.ps["ps3"]

	run := func(name string, attack func(t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			before := l.ok.Load()
			attack(t)
			l.clean(t, before)
		})
	}

	run("takeover of a live agent id with another token", func(t *testing.T) {
		_, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "a1", AgentIP: victimTarget.Addr(), Token: "rival-token", Endpoints: eps(victimTarget.String())})
		refusedWith(t, err, tunnel.CodeForbidden, `agent "a1" is live on this ps under another credential`)
	})
	run("takeover of a live agent id on a ps it does not use", func(t *testing.T) {
		s, err := hello(t, ps3.listen, "", &tunnel.Hello{AgentID: "a1", AgentIP: victimTarget.Addr(), Token: "rival-token", Endpoints: eps(victimTarget.String())})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer s.Close()
		if r := s.Welcome.Endpoints[0]; r.Code != tunnel.CodeConflict || !strings.Contains(r.Reason, "another credential") {
			t.Fatalf("the rival's claim of a1's target on ps3: %+v, want a conflict naming the other credential", r)
		}
	})
	run("a token that may not act as the agent id", func(t *testing.T) {
		_, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "a1", AgentIP: victimTarget.Addr(), Token: "narrow-token", Endpoints: eps(victimTarget.String())})
		refusedWith(t, err, tunnel.CodeUnauthorized, `may not act as agent "a1"`)
	})
	run("a claim outside the token's CIDRs", func(t *testing.T) {
		s, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "n1", AgentIP: netip.MustParseAddr("127.77.5.1"), Token: "narrow-token",
			Endpoints: eps("127.77.5.1:80", "127.77.6.1:80")})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer s.Close()
		if r := s.Welcome.Endpoints[1]; r.Code != tunnel.CodeForbidden || !strings.Contains(r.Reason, "outside the addresses this agent's credential lists") {
			t.Fatalf("127.77.6.1 outside the token's 127.77.5.0/24: %+v", r)
		}
		if s.Welcome.Endpoints[0].Port == 0 {
			t.Fatalf("the allowed endpoint was refused too: %+v", s.Welcome.Endpoints[0])
		}
	})
	run("a claim of an address that is not the tunnel's source", func(t *testing.T) {
		_, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "s1", AgentIP: netip.MustParseAddr("127.77.0.50"), Token: "source-token", Endpoints: eps("127.77.0.50:80")})
		refusedWith(t, err, tunnel.CodeForbidden, "is not the tunnel's source address 127.0.0.1")
		// The same claim from that address is the agent's own.
		s, err := hello(t, ps1.listen, "127.77.0.50", &tunnel.Hello{AgentID: "s1", AgentIP: netip.MustParseAddr("127.77.0.50"), Token: "source-token", Endpoints: eps("127.77.0.50:80")})
		if err != nil || s.Welcome.Endpoints[0].Port == 0 {
			t.Fatalf("an agent exposing its own source address: %v %+v", err, s)
		}
		s.Close()
	})
	run("claims of special and reserved addresses", func(t *testing.T) {
		_, redisPort, _ := net.SplitHostPort(w.rd.Addr())
		claims := map[string]string{
			"127.0.0.9:80":           "127.0.0.9 is in the loopback range",
			"0.1.2.3:80":             "0.1.2.3 is in the unspecified range",
			"169.254.1.1:80":         "169.254.1.1 is in the link-local range",
			"224.0.0.1:80":           "224.0.0.1 is in the multicast range",
			"127.77.0.200:80":        "127.77.0.200 is the address of this ps (ps1)",
			"127.77.0.201:80":        "127.77.0.201 is the address of ps ps2",
			"127.0.0.1:" + redisPort: "127.0.0.1 is the address of the registry",
		}
		var list []netip.AddrPort
		for c := range claims {
			list = append(list, netip.MustParseAddrPort(c))
		}
		// A ps learns the addresses of the others from their leases within
		// a renewal period.
		testutil.Eventually(t, 5*time.Second, "ps1 knows ps2's address", func() error {
			s, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "r1", AgentIP: netip.MustParseAddr("127.77.0.99"), Token: "rival-token", Endpoints: eps("127.77.0.201:80")})
			if err != nil {
				return err
			}
			defer s.Close()
			if r := s.Welcome.Endpoints[0]; r.Code != tunnel.CodeForbidden {
				return fmt.Errorf("claim of ps2's address: %+v", r)
			}
			return nil
		})
		// The unspecified address is not even a well-formed endpoint: the
		// encoder will not send it, and the ps's decoder refuses it as
		// bad_request (tunnel's protocol tests).
		_, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "r1", AgentIP: netip.MustParseAddr("127.77.0.99"), Token: "rival-token", Endpoints: eps("0.0.0.0:80")})
		if !errors.Is(err, tunnel.ErrMalformed) {
			t.Fatalf("a claim of 0.0.0.0:80: %v, want a malformed hello", err)
		}
		s, err := hello(t, ps1.listen, "", &tunnel.Hello{AgentID: "r1", AgentIP: netip.MustParseAddr("127.77.0.99"), Token: "rival-token", Endpoints: list})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer s.Close()
		for i, r := range s.Welcome.Endpoints {
			want := claims[list[i].String()]
			if r.Code != tunnel.CodeForbidden || r.Port != 0 || !strings.Contains(r.Reason, want) {
				t.Errorf("claim of %s: %+v, want forbidden saying %q", list[i], r, want)
			}
		}
	})
	run("1,024 streams opened by an agent", func(t *testing.T) { agentOpenedStreams(t, w, ps1) })
	run("64 silent handshakes", func(t *testing.T) { silentHandshakes(t, ps1) })
	run("1,000 idle client connections", func(t *testing.T) { idleConnections(t, w, ps1) })
	run("one token exhausting the port range", func(t *testing.T) { portExhaustion(t, w, ps1) })
	run("the proxy on a public address without auth", func(t *testing.T) {
		p := testutil.StartProc(t, "proxy", nil, tetherBin, "proxy", "--redis", w.rd.URL(), "--socks", "0.0.0.0:0")
		select {
		case <-p.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("a proxy listening on 0.0.0.0 without --auth-file or --allow-clients kept running")
		}
		if out := p.Output(); p.Cmd.ProcessState.ExitCode() == 0 || !strings.Contains(out, "--auth-file") {
			t.Fatalf("exit %d, output %q: want a failure naming --auth-file", p.Cmd.ProcessState.ExitCode(), out)
		}
	})
	run("passthrough to the proxy host's loopback", func(t *testing.T) {
		socks := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
		testutil.StartProc(t, "proxy", nil, tetherBin, "proxy", "--redis", w.rd.URL(), "--socks", socks, "--passthrough")
		testutil.WaitTCP(t, socks, 10*time.Second)
		// A routed target goes through, once the proxy has loaded the routes.
		testutil.Eventually(t, 10*time.Second, "the proxy carries the victim's route", func() error {
			if code := socksConnect(t, socks, victimTarget.String()); code != 0x00 {
				return fmt.Errorf("SOCKS CONNECT to the victim's route: reply %#x, want success", code)
			}
			return nil
		})
		if code := socksConnect(t, socks, w.rd.Addr()); code != 0x02 {
			t.Fatalf("SOCKS CONNECT %s through --passthrough: reply %#x, want 0x02 (not allowed by ruleset)", w.rd.Addr(), code)
		}
	})
}

// socksConnect asks the SOCKS5 proxy at socks to CONNECT to target (an
// IPv4 ip:port, no authentication) and returns the reply code.
func socksConnect(t *testing.T, socks, target string) byte {
	t.Helper()
	c, err := net.DialTimeout("tcp", socks, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	ap := netip.MustParseAddrPort(target)
	ip := ap.Addr().As4()
	req := []byte{5, 1, 0, 5, 1, 0, 1}
	req = append(append(req, ip[:]...), byte(ap.Port()>>8), byte(ap.Port()))
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	var reply [12]byte // method choice (2) + reply header with an IPv4 address (10)
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		t.Fatalf("read the SOCKS reply: %v", err)
	}
	return reply[3]
}

// agentOpenedStreams: a peer with a valid token opens 1,024 streams towards
// the PS and writes into each; the PS closes its session at the first one,
// counts it, and its memory stays flat.
func agentOpenedStreams(t *testing.T, w *world, ps *psNode) {
	rssBefore := ps.RSS(t)
	c, err := net.Dial("tcp", ps.listen)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := &tunnel.Hello{AgentID: "x1", AgentIP: netip.MustParseAddr("127.77.0.98"), Token: "rival-token", Epoch: uint64(time.Now().UnixNano()),
		Endpoints: eps("127.77.0.98:80")}
	if err := writeHello(c, h); err != nil {
		t.Fatal(err)
	}
	if typ, _, err := readFrame(c); err != nil || typ != 2 {
		t.Fatalf("want a welcome frame, got type %d, %v", typ, err)
	}
	mux, err := yamux.Server(c, yamux.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 64<<10)
	var wg sync.WaitGroup
	for i := 0; i < 1024; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := mux.OpenStream()
			if err != nil {
				return
			}
			_ = st.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = st.Write(payload)
		}()
	}
	wg.Wait()
	select {
	case <-mux.CloseChan():
	case <-time.After(10 * time.Second):
		t.Fatal("the ps kept the session of an agent that opens streams")
	}
	testutil.Eventually(t, 5*time.Second, "the violation is counted", func() error {
		if v := testutil.MetricValue(t, testutil.Scrape(t, ps.metrics), "tether_ps_tunnel_violations_total", "reason", "agent_opened_stream"); v < 1 {
			return fmt.Errorf("violations = %v", v)
		}
		return nil
	})
	growth := ps.RSS(t) - rssBefore
	t.Logf("ps RSS growth after 1,024 agent-opened streams: %.1f MiB", float64(growth)/(1<<20))
	if growth > 16<<20 {
		t.Fatalf("ps RSS grew by %.1f MiB, want a few MB at most", float64(growth)/(1<<20))
	}
}

// writeHello sends the preamble and a Hello as tunnel.Handshake does, so
// that the test can run the multiplexer on the raw connection itself.
func writeHello(c net.Conn, h *tunnel.Hello) error {
	body, err := tunnel.EncodeHello(h)
	if err != nil {
		return err
	}
	buf := append(append([]byte{}, tunnel.Magic[:]...), tunnel.Version, 1)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(body)))
	_, err = c.Write(append(buf, body...))
	return err
}

func readFrame(c net.Conn) (byte, []byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	var hdr [5]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return 0, nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
	_, err := io.ReadFull(c, body)
	return hdr[0], body, err
}

// silentHandshakes: 64 connections from one host that never send a Hello
// take at most that host's share of the handshake slots; a real agent
// elsewhere still gets in at once.
func silentHandshakes(t *testing.T, ps *psNode) {
	var silent []net.Conn
	defer func() {
		for _, c := range silent {
			c.Close()
		}
	}()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.66.0.1")}, Timeout: 5 * time.Second}
	for i := 0; i < 64; i++ {
		c, err := d.Dial("tcp", ps.listen)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	time.Sleep(200 * time.Millisecond) // let the ps accept them all
	start := time.Now()
	s, err := hello(t, ps.listen, "", &tunnel.Hello{AgentID: "b1", AgentIP: netip.MustParseAddr("127.77.2.1"), Token: "bystander-token", Endpoints: eps("127.77.2.1:80")})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("a real agent during 64 silent handshakes: %v (after %v)", err, took)
	}
	s.Close()
	t.Logf("a real agent got in after %v while 64 silent handshakes were open", took)
	if took > time.Second {
		t.Fatalf("a real agent took %v to get in, want under a second", took)
	}
	if v := testutil.MetricValue(t, testutil.Scrape(t, ps.metrics), "tether_ps_handshakes_total", "result", "source_busy"); v < 64-8 {
		t.Fatalf("source_busy refusals = %v, want at least 56 (64 silent minus the per-source limit of 8)", v)
	}
}

// idleConnections: 1,000 client connections to one endpoint that send
// nothing cost the PS a bounded amount of memory and goroutines each.
func idleConnections(t *testing.T, w *world, ps *psNode) {
	var port uint16
	for _, b := range tunneltest.WaitBackends(t, w.reg, silentTarget, 2) {
		if b.PSID == ps.id {
			port = b.Address.Port()
		}
	}
	addr := net.JoinHostPort(ps.advertise, fmt.Sprint(port))
	m := testutil.Scrape(t, ps.metrics)
	goBefore := testutil.MetricValue(t, m, "go_goroutines")
	rssBefore := ps.RSS(t)
	const n = 1000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	testutil.Eventually(t, 30*time.Second, "every connection is carried", func() error {
		if v := testutil.MetricValue(t, testutil.Scrape(t, ps.metrics), "tether_ps_streams_open"); v < n {
			return fmt.Errorf("streams open = %v", v)
		}
		return nil
	})
	time.Sleep(500 * time.Millisecond)
	goroutines := testutil.MetricValue(t, testutil.Scrape(t, ps.metrics), "go_goroutines") - goBefore
	rss := ps.RSS(t) - rssBefore
	t.Logf("1,000 idle client connections: ps RSS +%.1f MiB (%.1f KiB each), +%.0f goroutines (%.1f each)",
		float64(rss)/(1<<20), float64(rss)/n/1024, goroutines, goroutines/n)
	if rss > n*64<<10 {
		t.Fatalf("ps RSS grew by %.1f KiB per idle connection, want at most 64 KiB", float64(rss)/n/1024)
	}
	if goroutines > 3*n {
		t.Fatalf("%.0f goroutines for %d idle connections, want at most 3 each", goroutines, n)
	}
}

// portExhaustion: one token asks for more endpoints than the port range
// holds; its quota stops it at half the range, and another credential
// still gets ports.
func portExhaustion(t *testing.T, w *world, ps *psNode) {
	var list []netip.AddrPort
	for i := 0; i < w.ports*3/2; i++ {
		list = append(list, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 77, 1, byte(i % 250)}), uint16(1000+i)))
	}
	s, err := hello(t, ps.listen, "", &tunnel.Hello{AgentID: "g1", AgentIP: netip.MustParseAddr("127.77.1.1"), Token: "greedy-token", Endpoints: list})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	defer s.Close()
	ok, quota := 0, 0
	for _, r := range s.Welcome.Endpoints {
		switch r.Code {
		case tunnel.CodeOK:
			ok++
		case tunnel.CodeQuota:
			quota++
		default:
			t.Fatalf("unexpected refusal: %+v", r)
		}
	}
	t.Logf("one token asked for %d endpoints on a range of %d ports: %d granted, %d refused by its quota", len(list), w.ports, ok, quota)
	if ok != w.ports/2 || quota != len(list)-ok {
		t.Fatalf("granted %d, quota refusals %d; want %d granted (half the range) and the rest refused", ok, quota, w.ports/2)
	}
	b, err := hello(t, ps.listen, "", &tunnel.Hello{AgentID: "b1", AgentIP: netip.MustParseAddr("127.77.2.2"), Token: "bystander-token", Endpoints: eps("127.77.2.2:80")})
	if err != nil || b.Welcome.Endpoints[0].Port == 0 {
		t.Fatalf("another credential after the greedy one: %v %+v", err, b)
	}
	b.Close()
}

// A PS given no credential at all refuses to start, in one line.
func TestPSWithoutCredentialsRefusesToStart(t *testing.T) {
	skipShort(t)
	rd := testutil.StartRedis(t)
	p := testutil.StartProc(t, "ps", []string{cliconfig.TokenEnv + "="}, tetherBin, "ps", "--id", "ps1",
		"--listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)), "--advertise", "127.0.0.1", "--redis", rd.URL())
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("a ps without credentials kept running")
	}
	if p.Cmd.ProcessState.ExitCode() == 0 {
		t.Fatal("a ps without credentials exited 0")
	}
	out := strings.TrimSpace(p.Output())
	if !strings.Contains(out, "no agent credentials") || !strings.Contains(out, "--insecure") || strings.Count(out, "\n") > 1 {
		t.Fatalf("output %q: want one line naming the missing credentials and --insecure", out)
	}
}

// mTLS end to end with certificates from `tether certs`: the certificate
// is the agent's identity and lists what it may expose; a certificate for
// a1 cannot register as a2.
func TestMutualTLSIdentityFromTetherCerts(t *testing.T) {
	skipShort(t)
	dir := t.TempDir()
	for _, args := range [][]string{
		{"certs", "ca", "--dir", dir},
		{"certs", "ps", "--dir", dir, "--name", "ps", "--ip", "127.0.0.1"},
		{"certs", "agent", "--dir", dir, "--id", "a1", "--ip", "127.77.0.1"},
	} {
		if out, err := exec.Command(tetherBin, args...).CombinedOutput(); err != nil {
			t.Fatalf("tether %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	rd := testutil.StartRedis(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	ca, psCert, psKey := dir+"/ca.pem", dir+"/ps.pem", dir+"/ps-key.pem"
	a1Cert, a1Key := dir+"/agent-a1.pem", dir+"/agent-a1-key.pem"
	// No token anywhere: the client certificate is the only credential.
	testutil.StartProc(t, "ps", []string{cliconfig.TokenEnv + "="}, tetherBin, "ps", "--id", "ps1", "--listen", listen,
		"--advertise", "127.0.0.1", "--ports", tunneltest.FreeRange(t, 20), "--redis", rd.URL(), "--agent-cidrs", "127.77.0.0/16",
		"--tls-cert", psCert, "--tls-key", psKey, "--tls-ca", ca)
	testutil.WaitTCP(t, listen, 10*time.Second)
	srv := tunneltest.IdentityServer(t, "agent-a1")
	testutil.StartProc(t, "agent a1", []string{cliconfig.TokenEnv + "="}, tetherBin, "agent", "--id", "a1", "--ip", "127.77.0.1",
		"--expose", "9100="+srv, "--server", listen, "--tunnels", "1", "--tls-cert", a1Cert, "--tls-key", a1Key, "--tls-ca", ca)
	be := tunneltest.WaitBackends(t, reg, victimTarget, 1)[0]
	if got, err := tunneltest.Ask(be.Address.String()); err != nil || got != "agent-a1" {
		t.Fatalf("through the mTLS tunnel: %q, %v", got, err)
	}

	tlsCfg, err := tunnel.ClientTLSConfig(tunnel.TLSFiles{Cert: a1Cert, Key: a1Key, CA: ca}, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	handshake := func(h *tunnel.Hello) (*tunnel.AgentSession, error) {
		c, err := net.Dial("tcp", listen)
		if err != nil {
			t.Fatal(err)
		}
		h.Epoch = uint64(time.Now().UnixNano())
		return tunnel.Handshake(context.Background(), c, h, tunnel.ClientConfig{TLS: tlsCfg, Timeout: 10 * time.Second})
	}
	_, err = handshake(&tunnel.Hello{AgentID: "a2", AgentIP: netip.MustParseAddr("127.77.0.1"), Endpoints: eps("127.77.0.1:9300")})
	refusedWith(t, err, tunnel.CodeUnauthorized, `the client certificate is for agent "a1", not "a2"`)
	_, err = handshake(&tunnel.Hello{AgentID: "a1", AgentIP: netip.MustParseAddr("127.77.0.2"), Endpoints: eps("127.77.0.2:9100")})
	refusedWith(t, err, tunnel.CodeForbidden, "127.77.0.2 is outside the addresses this agent's credential lists")
	if got, err := tunneltest.Ask(be.Address.String()); err != nil || got != "agent-a1" {
		t.Fatalf("after the attempts: %q, %v", got, err)
	}
}

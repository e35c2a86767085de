package agent_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
)

const bulkSize = 50 << 20

// prng is a deterministic byte source, so both ends can compute the same
// 50 MB without holding it.
func prng(seed uint64) io.Reader {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return readerFunc(func(b []byte) (int, error) {
		for i := 0; i+8 <= len(b); i += 8 {
			v := r.Uint64()
			for k := 0; k < 8; k++ {
				b[i+k] = byte(v >> (8 * k))
			}
		}
		return len(b) &^ 7, nil
	})
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(b []byte) (int, error) { return f(b) }

func sumOf(r io.Reader) string {
	h := sha256.New()
	_, _ = io.Copy(h, r)
	return hex.EncodeToString(h.Sum(nil))
}

// Two PS nodes and one agent on loopback: the route gets a backend on each
// PS, and through each one an HTTP GET, a 50 MB download, a 50 MB upload
// answered after the client's half-close, all reach the agent's servers
// intact.
//
// It runs once per data path: every client connection over the tunnel's
// streams (mux), then every one over pooled data connections (pool).
func TestTwoPSOneAgentCarryTraffic(t *testing.T) {
	forEachDataPath(t, testTwoPSOneAgentCarryTraffic)
}

// dataPath is one way the PS carries client connections, for tests that
// must hold on both: opt configures a PS for it (and gives it a metrics
// registry), ready waits until the path is usable (the agent's pool has
// idle connections on every PS), and check, after the test, that every
// client connection took it.
type dataPath struct {
	name string
	pss  []*prometheus.Registry
}

func (d *dataPath) opt(c *ps.Config) {
	c.DataPath = d.name
	reg := prometheus.NewRegistry()
	c.Registerer = reg
	d.pss = append(d.pss, reg)
}

func (d *dataPath) ready(t *testing.T) {
	t.Helper()
	if d.name != ps.DataPathPool {
		return
	}
	testutil.Eventually(t, 10*time.Second, "the agent's pooled data connections on every PS", func() error {
		for i, reg := range d.pss {
			if testutil.MetricValue(t, reg, "tether_ps_pool_idle") < 1 {
				return fmt.Errorf("ps %d holds no idle data connection", i+1)
			}
		}
		return nil
	})
}

func (d *dataPath) check(t *testing.T) {
	t.Helper()
	other := ps.DataPathMux
	if d.name == ps.DataPathMux {
		other = ps.DataPathPool
	}
	var took, strayed float64
	for _, reg := range d.pss {
		took += testutil.MetricValue(t, reg, "tether_ps_data_path_total", "path", d.name)
		strayed += testutil.MetricValue(t, reg, "tether_ps_data_path_total", "path", other)
	}
	if took == 0 || strayed != 0 {
		t.Fatalf("client connections by path: %s %v, %s %v; want all on %s", d.name, took, other, strayed, d.name)
	}
}

func forEachDataPath(t *testing.T, f func(*testing.T, *dataPath)) {
	for _, name := range []string{ps.DataPathMux, ps.DataPathPool} {
		t.Run(name, func(t *testing.T) {
			d := &dataPath{name: name}
			f(t, d)
			d.check(t)
		})
	}
}

func testTwoPSOneAgentCarryTraffic(t *testing.T, path *dataPath) {
	rd := testutil.StartRedis(t)
	ps1 := tunneltest.StartPS(t, rd.URL(), "ps1", path.opt)
	ps2 := tunneltest.StartPS(t, rd.URL(), "ps2", path.opt)
	reg := tunneltest.NewRegistry(t, rd.URL())

	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from a1, path %s", r.URL.Path)
	})}
	go func() { _ = hs.Serve(httpLn) }()
	t.Cleanup(func() { hs.Close() })
	download := tunneltest.Serve(t, func(c *net.TCPConn) { _, _ = io.CopyN(c, prng(7), bulkSize) })
	upload := tunneltest.Serve(t, func(c *net.TCPConn) {
		sum := sumOf(c) // until the client's FIN
		_, _ = io.WriteString(c, sum)
	})

	tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{ps1.Addr, ps2.Addr},
		[]string{"80=" + httpLn.Addr().String(), "9200=" + download, "9300=" + upload}, nil)
	ip := "127.77.0.1"
	web := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort(ip+":80"), 2)
	dl := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort(ip+":9200"), 2)
	ul := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort(ip+":9300"), 2)
	wantDownload := sumOf(io.LimitReader(prng(7), bulkSize))
	path.ready(t)

	for i := range 2 {
		t.Run(web[i].PSID, func(t *testing.T) {
			// No kept-alive connection may outlive the request: the agent's
			// stop would wait its drain timeout for it.
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			resp, err := hc.Get("http://" + web[i].Address.String() + "/x")
			if err != nil {
				t.Fatalf("GET: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "hello from a1, path /x" {
				t.Fatalf("GET answered %q", body)
			}

			c, err := net.Dial("tcp", dl[i].Address.String())
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			n, got := countAndSum(c)
			c.Close()
			if n != bulkSize || got != wantDownload {
				t.Fatalf("download: %d bytes, sha256 %s; want %d bytes, %s", n, got, bulkSize, wantDownload)
			}

			c, err = net.Dial("tcp", ul[i].Address.String())
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			h := sha256.New()
			if _, err := io.CopyN(io.MultiWriter(c, h), prng(uint64(i+11)), bulkSize); err != nil {
				t.Fatalf("upload: %v", err)
			}
			// Half-close: the server answers only after it sees our FIN.
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			answer, err := io.ReadAll(c)
			c.Close()
			if err != nil || string(answer) != hex.EncodeToString(h.Sum(nil)) {
				t.Fatalf("upload checksum: server says %q (%v), client sent %x", answer, err, h.Sum(nil))
			}
		})
	}
}

func countAndSum(r io.Reader) (int64, string) {
	h := sha256.New()
	n, _ := io.Copy(h, r)
	return n, hex.EncodeToString(h.Sum(nil))
}

// With --tunnels 2 and a single PS, the agent runs on one tunnel and says
// so; as soon as a second PS is reachable it holds two again, and after a
// PS goes away and comes back, it returns to two.
func TestAgentKeepsTwoDistinctPSNodes(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	ps1 := tunneltest.StartPS(t, rd.URL(), "ps1", nil)
	ps2Listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	srv := tunneltest.IdentityServer(t, "a1")
	a, alog, _ := tunneltest.StartAgent(t, "a1", "127.77.0.2", []string{ps1.Addr, ps2Listen}, []string{"9100=" + srv}, nil)
	target := netip.MustParseAddrPort("127.77.0.2:9100")
	tunneltest.WaitBackends(t, reg, target, 1)
	testutil.Eventually(t, 10*time.Second, "the agent warns that only one PS is reachable", func() error {
		if !strings.Contains(alog.String(), "running with fewer tunnels than wanted") {
			return fmt.Errorf("no warning yet")
		}
		return nil
	})
	if held := a.HeldPS(); len(held) != 1 {
		t.Fatalf("agent holds %v, want one tunnel", held)
	}

	ps2 := tunneltest.StartPS(t, rd.URL(), "ps2", func(c *ps.Config) { c.Listen = ps2Listen })
	tunneltest.WaitBackends(t, reg, target, 2)
	waitHeld(t, a, "ps1", "ps2")

	ps2.Stop()
	tunneltest.WaitBackends(t, reg, target, 1)
	if got, err := tunneltest.Ask(mustBackend(t, reg, target)); err != nil || got != "a1" {
		t.Fatalf("through the remaining PS: %q, %v", got, err)
	}
	tunneltest.StartPS(t, rd.URL(), "ps2", func(c *ps.Config) { c.Listen = ps2Listen })
	tunneltest.WaitBackends(t, reg, target, 2)
	waitHeld(t, a, "ps1", "ps2")
}

func waitHeld(t *testing.T, a *agent.Agent, want ...string) {
	t.Helper()
	testutil.Eventually(t, 15*time.Second, fmt.Sprintf("agent holds %v", want), func() error {
		got := a.HeldPS()
		slices.Sort(got)
		if !slices.Equal(got, want) {
			return fmt.Errorf("holds %v", got)
		}
		return nil
	})
}

func mustBackend(t *testing.T, reg *registry.Registry, target netip.AddrPort) string {
	t.Helper()
	rt, err := reg.Get(context.Background(), target)
	if err != nil {
		t.Fatal(err)
	}
	return rt.Backends[0].Address.String()
}

// A server name that resolves to several addresses counts as several
// servers: the agent places its two tunnels on the two PS nodes behind it.
func TestOneNameWithSeveralAddressesIsSeveralServers(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	port := testutil.FreePort(t)
	tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) { c.Listen = fmt.Sprintf("127.0.0.1:%d", port) })
	tunneltest.StartPS(t, rd.URL(), "ps2", func(c *ps.Config) { c.Listen = fmt.Sprintf("127.0.0.2:%d", port) })
	srv := tunneltest.IdentityServer(t, "a1")
	a, _, _ := tunneltest.StartAgent(t, "a1", "127.77.0.7", []string{fmt.Sprintf("ps.pool.test:%d", port)}, []string{"9100=" + srv},
		func(c *agent.Config) {
			c.LookupNetIP = func(_ context.Context, host string) ([]netip.Addr, error) {
				if host != "ps.pool.test" {
					return nil, fmt.Errorf("unknown host %s", host)
				}
				return []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")}, nil
			}
		})
	tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort("127.77.0.7:9100"), 2)
	waitHeld(t, a, "ps1", "ps2")
}

// An endpoint refused because another live agent holds the target is
// asked for again later, and taken once the holder is gone; the endpoints
// the agent already had keep their ports meanwhile.
func TestRefusedEndpointIsRetried(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", nil)
	srvA := tunneltest.IdentityServer(t, "old-host")
	srvB := tunneltest.IdentityServer(t, "new-host")
	contested := netip.MustParseAddrPort("127.77.0.20:9100")
	own := netip.MustParseAddrPort("127.77.0.20:9200")
	_, _, stopA := tunneltest.StartAgent(t, "old", "127.77.0.20", []string{ps.Addr}, []string{"9100=" + srvA}, func(c *agent.Config) { c.Tunnels = 1 })
	tunneltest.WaitBackends(t, reg, contested, 1)
	_, blog, _ := tunneltest.StartAgent(t, "new", "127.77.0.20", []string{ps.Addr}, []string{"9100=" + srvB, "9200=" + srvB},
		func(c *agent.Config) { c.Tunnels = 1; c.RetryRefused = 300 * time.Millisecond })
	ownPort := tunneltest.WaitBackends(t, reg, own, 1)[0].Address
	testutil.Eventually(t, 10*time.Second, "the conflict is reported", func() error {
		if !strings.Contains(blog.String(), "code=conflict") {
			return fmt.Errorf("no conflict logged")
		}
		return nil
	})
	if got, err := tunneltest.Ask(mustBackend(t, reg, contested)); err != nil || got != "old-host" {
		t.Fatalf("the contested target while its holder lives: %q, %v", got, err)
	}
	stopA()
	testutil.Eventually(t, 15*time.Second, "the new agent takes the target over", func() error {
		rt, err := reg.Get(context.Background(), contested)
		if err != nil {
			return err
		}
		if rt.Backends[0].AgentID != "new" {
			return fmt.Errorf("held by %s", rt.Backends[0].AgentID)
		}
		return nil
	})
	if got, err := tunneltest.Ask(mustBackend(t, reg, contested)); err != nil || got != "new-host" {
		t.Fatalf("after the takeover: %q, %v", got, err)
	}
	if now := tunneltest.WaitBackends(t, reg, own, 1)[0].Address; now != ownPort {
		t.Fatalf("the retries moved an endpoint that was never refused: %v -> %v", ownPort, now)
	}
}

// When the agent cannot dial the local target, the client of the PS port
// gets a reset, not an empty answer that looks like success.
func TestDialErrorResetsTheClient(t *testing.T) {
	forEachDataPath(t, testDialErrorResetsTheClient)
}

func testDialErrorResetsTheClient(t *testing.T, path *dataPath) {
	rd := testutil.StartRedis(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	node := tunneltest.StartPS(t, rd.URL(), "ps1", path.opt)
	dead := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	tunneltest.StartAgent(t, "a1", "127.77.0.21", []string{node.Addr}, []string{"9100=" + dead}, func(c *agent.Config) { c.Tunnels = 1 })
	be := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort("127.77.0.21:9100"), 1)[0]
	path.ready(t)
	c, err := net.Dial("tcp", be.Address.String())
	if err == nil {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	// On loopback the reset can come back before the dial has returned, so
	// it shows up on the dial or on the first read: both are the refusal.
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client dial or read: %v, want a connection reset", err)
	}
}

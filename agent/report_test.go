package agent_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
)

// backendPS returns the ids of the PS nodes that back target now, with
// their addresses (live or not: the registry's own view).
func backendPS(reg *registry.Registry, target netip.AddrPort) (map[string]netip.AddrPort, error) {
	rt, err := reg.Get(context.Background(), target)
	if errors.Is(err, registry.ErrNotFound) {
		return map[string]netip.AddrPort{}, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]netip.AddrPort{}
	for _, b := range rt.Backends {
		out[b.PSID] = b.Address
	}
	return out, nil
}

// kill -9 of one of an agent's two PS nodes: the agent reports the lost
// tunnel through the other one, whose PS drops the dead PS's backend from
// the registry at once, long before the dead PS's lease (5 s) runs out;
// the surviving backend is untouched.
//
// It runs once per data path; a client connection held through the killed
// PS (on a pooled data connection in the pool run) fails at once, not
// after a timeout.
func TestKill9OfAPSIsReportedThroughTheOtherTunnel(t *testing.T) {
	forEachDataPath(t, testKill9OfAPSIsReportedThroughTheOtherTunnel)
}

func testKill9OfAPSIsReportedThroughTheOtherTunnel(t *testing.T, path *dataPath) {
	rd := testutil.StartRedis(t)
	psMetrics := prometheus.NewRegistry()
	psA := tunneltest.StartPS(t, rd.URL(), "ps-a", func(c *ps.Config) {
		c.DataPath = path.name
		c.Registerer = psMetrics
		path.pss = append(path.pss, psMetrics)
	})
	bin, err := testutil.BuildTether(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	listenB := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	psB := testutil.StartProc(t, "ps ps-b", nil, bin, "--log-level", "debug", "ps", "--id", "ps-b",
		"--listen", listenB, "--advertise", "127.0.0.1", "--ports", tunneltest.FreeRange(t, 20), "--redis", rd.URL(),
		"--token-file", tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n"),
		"--agent-cidrs", tunneltest.AgentRange, "--data-path", path.name, "--pool-listen", "127.0.0.1:0", "--data-plane", "listeners")
	testutil.WaitTCP(t, listenB, 10*time.Second)

	svc := tunneltest.IdentityServer(t, "svc")
	agentMetrics := prometheus.NewRegistry()
	_, alog, _ := tunneltest.StartAgent(t, "a-kill", "127.77.3.1", []string{psA.Addr, listenB}, []string{"9100=" + svc, "9200=" + echoLines(t)},
		func(c *agent.Config) { c.Registerer = agentMetrics })
	target := netip.MustParseAddrPort("127.77.3.1:9100")
	reg := tunneltest.NewRegistry(t, rd.URL())
	tunneltest.WaitBackends(t, reg, target, 2)
	echoB := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort("127.77.3.1:9200"), 2)
	path.ready(t)
	if path.name == ps.DataPathPool {
		testutil.Eventually(t, 10*time.Second, "the agent's pool on both PS nodes", func() error {
			if v := testutil.MetricValue(t, agentMetrics, "tether_agent_pool_idle"); v < 2 {
				return fmt.Errorf("%v idle data connections", v)
			}
			return nil
		})
	}
	var heldAddr netip.AddrPort
	for _, b := range echoB {
		if b.PSID == "ps-b" {
			heldAddr = b.Address
		}
	}
	held, err := net.Dial("tcp", heldAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldR := bufio.NewReader(held)
	if err := roundTrip(held, heldR, "before"); err != nil {
		t.Fatalf("held connection through ps-b: %v", err)
	}
	// The control channel opens right after the Welcome.
	testutil.Eventually(t, 5*time.Second, "ps-a's control channel to the agent", func() error {
		if !strings.Contains(psA.Log.String(), "control channel open") {
			return errors.New("not open yet")
		}
		return nil
	})
	before, err := backendPS(reg, target)
	if err != nil || len(before) != 2 {
		t.Fatalf("before the kill: %v %v", before, err)
	}

	killed := time.Now()
	psB.Kill()
	// The held connection's client socket was ps-b's: the kernel resets
	// or closes it when the process dies.
	_ = held.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := heldR.ReadString('\n'); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a connection held through the killed PS: read %v, want it ended at once", err)
	}
	var gone time.Duration
	for {
		now, err := backendPS(reg, target)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := now["ps-b"]; !ok {
			gone = time.Since(killed)
			if now["ps-a"] != before["ps-a"] || len(now) != 1 {
				t.Fatalf("the surviving backend changed: before %v, after %v", before, now)
			}
			break
		}
		if time.Since(killed) > 3*time.Second {
			t.Fatalf("the dead PS's backend is still in the registry %v after the kill", time.Since(killed))
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Logf("dead PS's backend removed from the registry %v after kill -9 (lease 5 s)", gone.Round(time.Millisecond))
	if gone > 500*time.Millisecond {
		t.Errorf("the dead PS's backend went %v after the kill, want within 500 ms", gone)
	}
	if got, err := tunneltest.Ask(before["ps-a"].String()); err != nil || got != "svc" {
		t.Errorf("through the surviving PS: %q, %v", got, err)
	}
	if v := testutil.MetricValue(t, psMetrics, "tether_ps_lost_tunnel_reports_total", "result", "dropped"); v != 1 {
		t.Errorf("ps-a counted %v dropped reports, want 1", v)
	}
	testutil.Eventually(t, 2*time.Second, "the agent counts the acked report", func() error {
		if v := testutil.MetricValue(t, agentMetrics, "tether_agent_lost_tunnel_reports_total", "result", "ok"); v != 1 {
			return fmt.Errorf("ok reports: %v", v)
		}
		return nil
	})
	if !strings.Contains(alog.String(), "reported lost tunnel") || !strings.Contains(psA.Log.String(), "lost-tunnel report: dropped") {
		t.Error("the report is not logged on both sides")
	}
}

// An agent that predates the control channel (it refuses the stream) is
// served as before, and its PS says why it gets no reports from it.
func TestAgentWithoutControlChannelStillServes(t *testing.T) {
	rd := testutil.StartRedis(t)
	psA := tunneltest.StartPS(t, rd.URL(), "ps-a", nil)
	svc := tunneltest.IdentityServer(t, "old")
	tunneltest.StartAgent(t, "a-old", "127.77.3.2", []string{psA.Addr}, []string{"9100=" + svc},
		func(c *agent.Config) { c.Tunnels = 1; c.DisableControl = true })
	reg := tunneltest.NewRegistry(t, rd.URL())
	bs := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort("127.77.3.2:9100"), 1)
	if got, err := tunneltest.Ask(bs[0].Address.String()); err != nil || got != "old" {
		t.Fatalf("through the PS: %q, %v", got, err)
	}
	testutil.Eventually(t, 5*time.Second, "the PS logs the missing control channel", func() error {
		if !strings.Contains(psA.Log.String(), "no control channel") {
			return errors.New("not yet")
		}
		return nil
	})
}

// echoLines answers every line with itself until the client closes.
func echoLines(t *testing.T) string {
	return tunneltest.Serve(t, func(c *net.TCPConn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if _, err := c.Write([]byte(line)); err != nil {
				return
			}
		}
	})
}

func roundTrip(c net.Conn, r *bufio.Reader, msg string) error {
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return err
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo: got %q", got)
	}
	return nil
}

// On shutdown the agent has the PS withdraw its routes first, lets the
// connection in flight finish, and stops as soon as it has (well before
// --drain-timeout); with a connection that never ends, the drain timeout
// ends it.
func TestDrainWithdrawsRoutesThenFinishesStreamsInFlight(t *testing.T) {
	rd := testutil.StartRedis(t)
	psA := tunneltest.StartPS(t, rd.URL(), "ps-a", nil)
	echo := echoLines(t)
	reg := tunneltest.NewRegistry(t, rd.URL())
	for _, tc := range []struct {
		name         string
		ip           string
		drainTimeout time.Duration
		closeClient  bool
		maxStop      time.Duration
	}{
		{"client finishes", "127.77.3.3", 30 * time.Second, true, 5 * time.Second},
		{"drain timeout", "127.77.3.4", 500 * time.Millisecond, false, 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, alog, stop := tunneltest.StartAgent(t, "a-drain-"+tc.ip, tc.ip, []string{psA.Addr}, []string{"9100=" + echo},
				func(c *agent.Config) { c.Tunnels = 1; c.DrainTimeout = tc.drainTimeout })
			target := netip.MustParseAddrPort(tc.ip + ":9100")
			bs := tunneltest.WaitBackends(t, reg, target, 1)
			c, err := net.Dial("tcp", bs[0].Address.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			if err := roundTrip(c, r, "before"); err != nil {
				t.Fatal(err)
			}

			stopped := make(chan time.Duration, 1)
			start := time.Now()
			go func() { stop(); stopped <- time.Since(start) }()
			tunneltest.WaitBackends(t, reg, target, 0)
			withdrawn := time.Since(start)
			if err := roundTrip(c, r, "in flight after the withdrawal"); err != nil {
				t.Fatalf("the connection in flight broke when the routes were withdrawn: %v", err)
			}
			if n, err := net.DialTimeout("tcp", bs[0].Address.String(), time.Second); err == nil {
				// The PS port is released: a new connection is refused or reset.
				_ = n.SetDeadline(time.Now().Add(2 * time.Second))
				if _, err := n.Read(make([]byte, 1)); err == nil {
					t.Error("a new connection after the withdrawal reached the agent")
				}
				n.Close()
			}
			if tc.closeClient {
				c.Close()
			}
			select {
			case took := <-stopped:
				t.Logf("routes withdrawn %v after the stop began; agent stopped after %v", withdrawn.Round(time.Millisecond), took.Round(time.Millisecond))
				if !tc.closeClient && took < tc.drainTimeout {
					t.Errorf("stopped after %v with a stream in flight, before the drain timeout %v", took, tc.drainTimeout)
				}
			case <-time.After(tc.maxStop):
				t.Fatalf("the agent did not stop within %v", tc.maxStop)
			}
			if !strings.Contains(alog.String(), "drain: the ps withdrew this tunnel's routes") {
				t.Error("the agent did not log the withdrawal")
			}
		})
	}
}

package ps_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// rawAgent handshakes as agentID exposing targets, serves the session's
// streams only as far as taking the control channel, and returns the
// session once that channel is open.
func rawAgent(t *testing.T, addr, agentID string, epoch uint64, targets ...string) *tunnel.AgentSession {
	t.Helper()
	h := &tunnel.Hello{AgentID: agentID, AgentIP: netip.MustParseAddrPort(targets[0]).Addr(), Epoch: epoch}
	for _, s := range targets {
		h.Endpoints = append(h.Endpoints, netip.MustParseAddrPort(s))
	}
	s, err := tunneltest.Handshake(addr, h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	go func() {
		for {
			in, err := s.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				if _, err := in.ReadHeader(time.Second); !errors.Is(err, tunnel.ErrControlStream) {
					_ = in.Reject(tunnel.StreamNotExposed, "test agent")
				}
			}()
		}
	}()
	testutil.Eventually(t, 5*time.Second, "control channel of "+agentID, func() error {
		if s.Control() == nil {
			return errors.New("not open")
		}
		return nil
	})
	return s
}

func report(t *testing.T, s *tunnel.AgentSession, deadPS string, routes ...tunnel.LostRoute) *tunnel.Ack {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	ack, err := s.Control().ReportLost(ctx, deadPS, routes)
	if err != nil {
		t.Fatalf("report: %v", err)
	}
	return ack
}

// A report can drop only the reporting agent's own backends, on the port
// it names, and never through a session that is not the agent's current
// one or about the PS that receives it.
func TestLostTunnelReportsDropOnlyTheAgentsOwnBackends(t *testing.T) {
	rd := testutil.StartRedis(t)
	metrics := prometheus.NewRegistry()
	psA := tunneltest.StartPS(t, rd.URL(), "ps-a", func(c *ps.Config) { c.Registerer = metrics })
	reg := tunneltest.NewRegistry(t, rd.URL())
	ctx := context.Background()
	// The "dead" PS ps-x: its lease and backends, written as it would.
	if err := reg.RenewPS(ctx, registry.PSLease{ID: "ps-x", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	mine, theirs := netip.MustParseAddrPort("127.77.4.1:9100"), netip.MustParseAddrPort("127.77.4.2:9100")

	a1 := rawAgent(t, psA.Addr, "a1", 1, mine.String())
	a2 := rawAgent(t, psA.Addr, "a2", 1, theirs.String())
	// The registry's owner of a1's routes is its session's credential,
	// which ps-a published: read it back, and publish ps-x's entries under it.
	owners := map[netip.AddrPort]string{}
	for _, target := range []netip.AddrPort{mine, theirs} {
		bs := tunneltest.WaitBackends(t, reg, target, 1)
		owners[target] = bs[0].Owner
	}
	if errs, err := reg.Publish(ctx, "ps-x", []registry.Publication{
		{Target: mine, Port: 30001, AgentID: "a1", Owner: owners[mine]},
		{Target: theirs, Port: 30002, AgentID: "a2", Owner: owners[theirs]},
	}); err != nil || errs[0] != nil || errs[1] != nil {
		t.Fatalf("publish ps-x: %v %v", errs, err)
	}
	tunneltest.WaitBackends(t, reg, mine, 2)

	for _, tc := range []struct {
		name   string
		routes []tunnel.LostRoute
	}{
		{"another agent's route", []tunnel.LostRoute{{Target: theirs, Port: 30002}}},
		{"a wrong port", []tunnel.LostRoute{{Target: mine, Port: 30009}}},
	} {
		if ack := report(t, a1, "ps-x", tc.routes...); ack.Code != tunnel.CodeOK || ack.Count != 0 {
			t.Errorf("%s: ack %+v, want ok and nothing dropped", tc.name, ack)
		}
	}
	tunneltest.WaitBackends(t, reg, mine, 2)
	tunneltest.WaitBackends(t, reg, theirs, 2)
	if ack := report(t, a1, "ps-a", tunnel.LostRoute{Target: mine, Port: 30001}); ack.Code != tunnel.CodeBadRequest {
		t.Errorf("a report naming the receiving PS: ack %+v, want bad_request", ack)
	}

	// a1's own backend on ps-x goes; ps-a's stays; a2's is untouched.
	if ack := report(t, a1, "ps-x", tunnel.LostRoute{Target: mine, Port: 30001}, tunnel.LostRoute{Target: theirs, Port: 30002}); ack.Code != tunnel.CodeOK || ack.Count != 1 {
		t.Errorf("own report: ack %+v, want ok with 1 dropped", ack)
	}
	if bs := tunneltest.WaitBackends(t, reg, mine, 1); bs[0].PSID != "ps-a" {
		t.Errorf("the survivor is %+v, want ps-a's", bs[0])
	}
	tunneltest.WaitBackends(t, reg, theirs, 2)
	_ = a2

	// A superseded session speaks for an agent process on its way out.
	rawAgent(t, psA.Addr, "a1", 2, mine.String())
	<-a1.Done()
	if c := a1.Control(); c != nil {
		if _, err := c.ReportLost(ctx, "ps-x", nil); err == nil {
			t.Error("a report through a closed, superseded session was acked")
		}
	}
	for result, want := range map[string]float64{"dropped": 1, "unmatched": 2, "refused": 1, "error": 0} {
		if v := testutil.MetricValue(t, metrics, "tether_ps_lost_tunnel_reports_total", "result", result); v != want {
			t.Errorf("reports %s: %v, want %v", result, v, want)
		}
	}
}

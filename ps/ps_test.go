package ps_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// rawHello dials the PS and runs a handshake as an agent would.
func rawHello(t *testing.T, addr string, h *tunnel.Hello) (*tunnel.AgentSession, error) {
	t.Helper()
	if h.Token == "" {
		h.Token = tunneltest.Token
	}
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
// (docs/DESIGN.md, invariant 7).
func TestBadInputIsRefusedWhileAGoodTunnelKeepsWorking(t *testing.T) {
	rd := testutil.StartRedis(t)
	tokens := tunneltest.WriteTokens(t, "# agents\ngood-token * 127.77.0.0/16,127.78.0.0/16\nlimited-token * 127.80.0.0/16\nother-token host-*,b1 127.78.0.0/16\nrival-token a1 127.77.0.0/16\n")
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.TokenFile = tokens
		c.AgentCIDRs = []string{"127.77.0.0/16", "127.78.0.0/16"}
		c.PreambleTimeout = 700 * time.Millisecond
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

	for _, c := range badInputCases(ps.Addr, target) {
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

// badInput is one kind of bad handshake: run makes it against the PS and
// returns the refusal's code and reason.
type badInput struct {
	name    string
	run     func(t *testing.T) (tunnel.Code, string)
	code    tunnel.Code
	logSays string
}

func badInputCases(psAddr string, target netip.AddrPort) []badInput {
	raw := func(b []byte) func(t *testing.T) (tunnel.Code, string) {
		return func(t *testing.T) (tunnel.Code, string) {
			r := rawRefusal(t, psAddr, b)
			return r.Code, r.Reason
		}
	}
	refused := func(mod func(h *tunnel.Hello)) func(t *testing.T) (tunnel.Code, string) {
		return func(t *testing.T) (tunnel.Code, string) {
			_, err := rawHello(t, psAddr, badHello(mod))
			var rf *tunnel.Refuse
			if !errors.As(err, &rf) {
				t.Fatalf("got %v, want a refusal", err)
			}
			return rf.Code, rf.Reason
		}
	}
	return []badInput{
		{"garbage bytes", raw([]byte("\x16\x03\x01 hello? this is not tether")), tunnel.CodeBadRequest, "bad magic"},
		{"unknown version", raw(preamble(9)), tunnel.CodeVersion, "agent speaks version 9"},
		{"oversized frame", raw(append(preamble(tunnel.Version), 1, 0x40, 0, 0, 0)), tunnel.CodeTooLarge, "frame of 1073741824 bytes"},
		{"slow handshake", raw(preamble(tunnel.Version)), tunnel.CodeTimeout, "hello not received within 700ms"}, // then silence
		{"wrong token", refused(func(h *tunnel.Hello) { h.Token = "guess" }), tunnel.CodeUnauthorized, "token not accepted"},
		{"token limited to other CIDRs", refused(func(h *tunnel.Hello) { h.Token = "limited-token" }), tunnel.CodeForbidden, "outside the addresses this agent's credential lists"},
		{"token for other agent ids", refused(func(h *tunnel.Hello) { h.Token = "other-token" }), tunnel.CodeUnauthorized, `this token may not act as agent \"bad\"`},
		{"takeover of a live agent id with another token", refused(func(h *tunnel.Hello) {
			h.Token, h.AgentID, h.Epoch = "rival-token", "a1", uint64(time.Now().UnixNano())
			h.AgentIP, h.Endpoints = netip.MustParseAddr("127.77.0.1"), []netip.AddrPort{target}
		}), tunnel.CodeForbidden, `agent \"a1\" is live on this ps under another credential`},
		{"epoch far ahead of the clock", refused(func(h *tunnel.Hello) { h.Epoch = 1 << 63 }), tunnel.CodeBadRequest, "ahead of this ps's clock"},
		{"unnamed loopback agent ip", refused(func(h *tunnel.Hello) { h.AgentIP = netip.MustParseAddr("127.0.0.5") }), tunnel.CodeForbidden, "127.0.0.5 is in the loopback range"},
		{"the ps's own address", refused(func(h *tunnel.Hello) { h.AgentIP = netip.MustParseAddr("127.0.0.1") }), tunnel.CodeForbidden, "127.0.0.1 is the address of"},
		{"exposure of another agent's live route", func(t *testing.T) (tunnel.Code, string) {
			s, err := rawHello(t, psAddr, badHello(func(h *tunnel.Hello) {
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
}

// badHello is a Hello with a valid token from an agent that did not start
// yet, changed by mod.
func badHello(mod func(h *tunnel.Hello)) *tunnel.Hello {
	h := &tunnel.Hello{AgentID: "bad", AgentIP: netip.MustParseAddr("127.78.0.1"), Token: "good-token", Epoch: 1,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.78.0.1:80")}}
	if mod != nil {
		mod(h)
	}
	return h
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

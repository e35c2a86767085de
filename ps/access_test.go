package ps_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/cliconfig"
	tu "github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// askFrom connects from a given loopback source address.
func askFrom(src, addr string) (string, error) {
	d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 64)
	n, err := c.Read(b)
	if n > 0 {
		return string(b[:n]), nil
	}
	return "", err
}

// Data ports accept only --allow-clients sources; exposures outside
// --agent-cidrs are refused; both are counted and logged.
func TestAllowClientsAndAgentCIDRs(t *testing.T) {
	rd := tu.StartRedis(t)
	reg := prometheus.NewRegistry()
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.AllowClients = []string{"127.0.0.2/32"}
		c.AgentCIDRs = []string{"127.77.0.0/16"}
		c.Registerer = reg
	})
	r := tunneltest.NewRegistry(t, rd.URL())
	srv := tunneltest.IdentityServer(t, "a1")
	_, alog, _ := tunneltest.StartAgent(t, "a1", "127.77.0.3", []string{ps.Addr}, []string{"9100=" + srv}, func(c *agent.Config) { c.Tunnels = 1 })
	be := tunneltest.WaitBackends(t, r, netip.MustParseAddrPort("127.77.0.3:9100"), 1)[0]

	if got, err := askFrom("127.0.0.2", be.Address.String()); err != nil || got != "a1" {
		t.Fatalf("an allowed client got %q, %v", got, err)
	}
	if got, err := askFrom("127.0.0.1", be.Address.String()); err == nil || got != "" {
		t.Fatalf("a client outside --allow-clients got %q, %v", got, err)
	}
	if n := tu.MetricValue(t, reg, "tether_ps_clients_rejected_total"); n != 1 {
		t.Fatalf("clients rejected = %v, want 1", n)
	}

	// One Hello, one endpoint inside --agent-cidrs and one outside: the
	// tunnel is welcomed, and the Welcome refuses the outside endpoint alone.
	allowed, outside := netip.MustParseAddrPort("127.77.0.9:80"), netip.MustParseAddrPort("127.99.0.9:80")
	sess, err := tunneltest.Handshake(ps.Addr, &tunnel.Hello{AgentID: "a9", AgentIP: netip.MustParseAddr("127.77.0.9"), Epoch: 1,
		Endpoints: []netip.AddrPort{allowed, outside}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	res := sess.Welcome.Endpoints
	if len(res) != 2 {
		t.Fatalf("welcome has %d endpoint results for 2 endpoints: %+v", len(res), res)
	}
	if res[0].Code != tunnel.CodeOK || res[0].Port == 0 {
		t.Fatalf("endpoint %s inside --agent-cidrs: %+v, want ok with a port", allowed, res[0])
	}
	if res[1].Code != tunnel.CodeForbidden || res[1].Port != 0 {
		t.Fatalf("endpoint %s outside --agent-cidrs: %+v, want %s without a port", outside, res[1], tunnel.CodeForbidden)
	}
	// The PS counts a handshake when it commits the session, just after
	// the Welcome went out: the agent may read the Welcome first.
	tu.Eventually(t, 5*time.Second, "both handshakes counted ok", func() error {
		if n := tu.MetricValue(t, reg, "tether_ps_handshakes_total", "result", "ok"); n != 2 {
			return fmt.Errorf("handshakes ok = %v, want 2 (the good agent and a9, whose tunnel stands)", n)
		}
		return nil
	})
	tunneltest.WaitBackends(t, r, allowed, 1)
	if rt, err := r.Get(context.Background(), outside); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("the refused endpoint has a route: %+v, %v", rt, err)
	}
	tu.Eventually(t, 5*time.Second, "the refused exposure is logged", func() error {
		if !strings.Contains(ps.Log.String(), "endpoint 127.99.0.9 is in the loopback range, exposed only when the ps's --agent-cidrs names it") {
			return errors.New("not logged")
		}
		return nil
	})
	if strings.Contains(alog.String(), "level=ERROR") {
		t.Fatalf("the good agent logged errors:\n%s", alog.String())
	}
}

// Handshakes beyond --max-handshakes are refused as busy at once.
func TestHandshakeLimitRefusesBusy(t *testing.T) {
	rd := tu.StartRedis(t)
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.MaxHandshakes = 1
		c.HandshakeTimeout = 5 * time.Second
	})
	// A connection that sends nothing holds the only handshake slot.
	hold, err := net.Dial("tcp", ps.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	tu.Eventually(t, 5*time.Second, "a busy refusal", func() error {
		_, err := tunneltest.Handshake(ps.Addr, &tunnel.Hello{AgentID: "a1", AgentIP: netip.MustParseAddr("127.77.0.1"), Epoch: 1})
		var rf *tunnel.Refuse
		if !errors.As(err, &rf) || rf.Code != tunnel.CodeBusy {
			return fmt.Errorf("got %v", err)
		}
		return nil
	})
}

// A PS with TLS and --tls-ca: an agent with a client certificate signed by
// the CA carries traffic; one without is refused, and says why.
func TestTLSTunnelsEndToEnd(t *testing.T) {
	rd := tu.StartRedis(t)
	pki := tunneltest.NewPKI(t)
	ps := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.TLSCert, c.TLSKey, c.TLSCA = pki.ServerCert, pki.ServerKey, pki.CA
	})
	r := tunneltest.NewRegistry(t, rd.URL())
	srv := tunneltest.IdentityServer(t, "tls-agent")
	// The test PKI's client certificate speaks for agent id "agent".
	tunneltest.StartAgent(t, "agent", "127.77.0.4", []string{ps.Addr}, []string{"9100=" + srv}, func(c *agent.Config) {
		c.Tunnels = 1
		c.TLSCert, c.TLSKey, c.TLSCA = pki.ClientCert, pki.ClientKey, pki.CA
	})
	be := tunneltest.WaitBackends(t, r, netip.MustParseAddrPort("127.77.0.4:9100"), 1)[0]
	if got, err := tunneltest.Ask(be.Address.String()); err != nil || got != "tls-agent" {
		t.Fatalf("through the TLS tunnel: %q, %v", got, err)
	}

	_, noCert, _ := tunneltest.StartAgent(t, "a2", "127.77.0.5", []string{ps.Addr}, []string{"9100=" + srv}, func(c *agent.Config) {
		c.Tunnels = 1
		c.TLSCA = pki.CA
	})
	_, wrongCA, _ := tunneltest.StartAgent(t, "a3", "127.77.0.6", []string{ps.Addr}, []string{"9100=" + srv}, func(c *agent.Config) {
		c.Tunnels = 1
		c.TLSCert, c.TLSKey, c.TLSCA = pki.ClientCert, pki.ClientKey, pki.OtherCA
	})
	tu.Eventually(t, 10*time.Second, "both bad agents fail and say why", func() error {
		if !strings.Contains(noCert.String(), "tunnel attempt failed") {
			return errors.New("agent without a client certificate did not fail")
		}
		if !strings.Contains(wrongCA.String(), "certificate signed by unknown authority") {
			return errors.New("agent with the wrong CA did not report the verification failure")
		}
		if !strings.Contains(ps.Log.String(), "code=tls_error") {
			return errors.New("the ps did not log the TLS refusal")
		}
		return nil
	})
	if _, err := r.Get(context.Background(), netip.MustParseAddrPort("127.77.0.5:9100")); err == nil {
		t.Fatal("an agent without a client certificate got a route")
	}
}

// Without credentials a PS does not start, unless --insecure says so; an
// insecure PS accepts agents without a token and says so in its metrics.
func TestInsecureMustBeExplicit(t *testing.T) {
	cfg := ps.DefaultConfig()
	cfg.ID, cfg.Advertise, cfg.Redis = "ps1", []string{"127.0.0.1"}, "redis://127.0.0.1:1/0"
	t.Setenv(cliconfig.TokenEnv, "")
	if _, err := ps.New(cfg); err == nil || !strings.Contains(err.Error(), "no agent credentials") {
		t.Fatalf("a ps without credentials: %v, want an error naming the missing credentials", err)
	}
	cfg.Insecure, cfg.TokenFile = true, tunneltest.WriteTokens(t, "tok *\n")
	if _, err := ps.New(cfg); err == nil || !strings.Contains(err.Error(), "--insecure contradicts") {
		t.Fatalf("--insecure with a token file: %v, want a contradiction", err)
	}

	rd := tu.StartRedis(t)
	reg := prometheus.NewRegistry()
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.TokenFile, c.Insecure, c.Registerer = "", true, reg
	})
	if v := tu.MetricValue(t, reg, "tether_ps_insecure"); v != 1 {
		t.Fatalf("tether_ps_insecure = %v, want 1", v)
	}
	if !strings.Contains(node.Log.String(), "running with --insecure") {
		t.Fatal("an insecure ps does not warn at start")
	}
	// An agent with no token at all, exposing its own source address.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.77.0.30")}}
	c, err := d.Dial("tcp", node.Addr)
	if err != nil {
		t.Fatal(err)
	}
	s, err := tunnel.Handshake(context.Background(), c, &tunnel.Hello{AgentID: "anon", AgentIP: netip.MustParseAddr("127.77.0.30"), Epoch: 1,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.77.0.30:80")}}, tunnel.ClientConfig{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("an insecure ps refused an agent without credentials: %v", err)
	}
	s.Close()
}

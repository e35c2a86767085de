package agent_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/tunnel"
)

// fakePS accepts one tunnel with the protocol's own primitives and hands
// back its session, so a test can open any stream it likes.
func fakePS(t *testing.T) (addr string, hello <-chan *tunnel.Hello, sess <-chan *tunnel.PSSession) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	hc := make(chan *tunnel.Hello, 1)
	sc := make(chan *tunnel.PSSession, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			h, err := tunnel.ReadHello(c)
			if err != nil {
				c.Close()
				continue
			}
			w := &tunnel.Welcome{PSID: "fake", PSAddr: netip.MustParseAddr("127.0.0.1")}
			for i := range h.Endpoints {
				w.Endpoints = append(w.Endpoints, tunnel.EndpointResult{Port: uint16(30000 + i)})
			}
			if err := tunnel.WriteWelcome(c, w); err != nil {
				c.Close()
				continue
			}
			_ = c.SetDeadline(time.Time{})
			s, err := tunnel.NewPSSession(c, nil, 0)
			if err != nil {
				c.Close()
				continue
			}
			t.Cleanup(func() { s.Close() })
			hc <- h
			sc <- s
			return
		}
	}()
	return ln.Addr().String(), hc, sc
}

// The agent serves only the targets it exposes (docs/DESIGN.md, invariant 1), and
// reports dial failures in the stream status; its IP defaults to the
// source address of the route towards the server.
func TestAgentChecksTargetsAndReportsDialErrors(t *testing.T) {
	addr, hello, sess := fakePS(t)
	srv := tunneltest.IdentityServer(t, "local")
	dead := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)) // nothing listens here
	tunneltest.StartAgent(t, "a1", "", []string{addr}, []string{"9100=" + srv, "9200=" + dead}, func(c *agent.Config) { c.Tunnels = 1 })
	var h *tunnel.Hello
	var s *tunnel.PSSession
	select {
	case h = <-hello:
		s = <-sess
	case <-time.After(10 * time.Second):
		t.Fatal("the agent never connected")
	}
	if h.AgentIP != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("agent ip %v, want the source address towards 127.0.0.1", h.AgentIP)
	}
	open := func(target string) (string, error) {
		st, err := s.Open(tunnel.StreamHeader{Target: netip.MustParseAddrPort(target)}, 5*time.Second)
		if err != nil {
			return "", err
		}
		defer st.Close()
		b, err := io.ReadAll(st)
		return string(b), err
	}
	if got, err := open("127.0.0.1:9100"); err != nil || got != "local" {
		t.Fatalf("exposed target: %q, %v", got, err)
	}
	_, err := open("127.0.0.1:9300")
	var se *tunnel.StreamError
	if !errors.As(err, &se) || se.Code != tunnel.StreamNotExposed {
		t.Fatalf("a target the agent does not expose: got %v, want not_exposed", err)
	}
	_, err = open("127.0.0.2:9100") // right port, other address
	if !errors.As(err, &se) || se.Code != tunnel.StreamNotExposed {
		t.Fatalf("another address with an exposed port: got %v, want not_exposed", err)
	}
	_, err = open("127.0.0.1:9200")
	if !errors.As(err, &se) || se.Code != tunnel.StreamDialRefused {
		t.Fatalf("a target whose local server is down: got %v, want dial_refused", err)
	}
}

package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
)

// stack: a real Redis, two PS nodes and an agent exposing 127.77.0.1:9100
// (nothing listens there), a route for 127.0.0.1:<port> for name lookups,
// both answering "agent-a1"; and the proxy, with both listeners.
type stack struct {
	reg       *registry.Registry
	redis     string // the registry's host:port
	socks     string
	http      string
	localPort int
	ps        []*tunneltest.PSNode
}

const target = "127.77.0.1:9100"

func newStack(t *testing.T, mod func(*Config)) *stack {
	t.Helper()
	rd := testutil.StartRedis(t)
	s := &stack{reg: tunneltest.NewRegistry(t, rd.URL()), redis: rd.Addr()}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "agent-a1") })}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	var servers []string
	for _, id := range []string{"ps1", "ps2"} {
		n := tunneltest.StartPS(t, rd.URL(), id, nil)
		s.ps = append(s.ps, n)
		servers = append(servers, n.Addr)
	}
	tunneltest.StartAgent(t, "a1", "127.77.0.1", servers, []string{"9100=" + ln.Addr().String()}, nil)
	// A route for 127.0.0.1:<localPort>, so that "localhost" names a target
	// with a route. No agent may expose an address of the PS's own host, so
	// it is written into the registry directly, as a PS would, its backend
	// the service itself.
	s.localPort = testutil.FreePort(t)
	ctx := context.Background()
	local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(s.localPort))
	if err := s.reg.RenewPS(ctx, registry.PSLease{ID: "ps-local", Addr: local.Addr(), State: registry.PSActive, ExpiresAt: time.Now().Add(10 * time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if errs, err := s.reg.Publish(ctx, "ps-local", []registry.Publication{{Target: local, Port: uint16(ln.Addr().(*net.TCPAddr).Port), AgentID: "a-local"}}); err != nil || errs[0] != nil {
		t.Fatal(err, errs)
	}
	tunneltest.WaitBackends(t, s.reg, netip.MustParseAddrPort(target), 2)
	tunneltest.WaitBackends(t, s.reg, local, 1)

	cfg := DefaultConfig()
	cfg.Redis = rd.URL()
	cfg.Socks = "127.0.0.1:0"
	cfg.HTTP = "127.0.0.1:0"
	log, lb := tunneltest.NewLog(t, "proxy")
	cfg.Logger = log
	if mod != nil {
		mod(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.dialControl = loopbackOnly
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = p.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		p.Close()
		if t.Failed() {
			t.Logf("proxy log:\n%s", lb.String())
		}
	})
	<-p.mirror.Ready()
	sa, _ := p.Addr(ctx, "socks")
	ha, _ := p.Addr(ctx, "http")
	s.socks, s.http = sa.String(), ha.String()
	return s
}

func curl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	bin := testutil.RequireBinary(t, "curl")
	out, err := exec.Command(bin, append([]string{"-sS", "--max-time", "5"}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func TestCurlReachesTheAgentThroughEveryProxyForm(t *testing.T) {
	s := newStack(t, nil)
	cases := [][]string{
		{"--socks5", s.socks, "http://" + target + "/"},
		{"--socks5-hostname", s.socks, fmt.Sprintf("http://localhost:%d/", s.localPort)},
		{"-x", "http://" + s.http, "http://" + target + "/"},
		{"-p", "-x", "http://" + s.http, "http://" + target + "/"},
	}
	for _, args := range cases {
		out, err := curl(t, args...)
		if err != nil || out != "agent-a1" {
			t.Errorf("curl %s: %v %q", strings.Join(args, " "), err, out)
		}
	}
}

func TestUnknownTargetsGetTheRightRefusal(t *testing.T) {
	s := newStack(t, nil)
	out, err := curl(t, "--socks5", s.socks, "http://127.77.0.9:1/")
	if err == nil || !strings.Contains(out, "(2)") { // 2: not allowed by ruleset
		t.Errorf("socks5 to a target without a route: want reply 2 (not allowed by ruleset), got %v %q", err, out)
	}
	out, _ = curl(t, "-o", "/dev/null", "-w", "%{http_code}", "-x", "http://"+s.http, "http://127.77.0.9:1/")
	if out != "403" {
		t.Errorf("http proxy to a target without a route: want 403, got %q", out)
	}
	out, err = curl(t, "-p", "-x", "http://"+s.http, "http://127.77.0.9:1/")
	if err == nil || !strings.Contains(out, "403") {
		t.Errorf("CONNECT to a target without a route: want 403, got %v %q", err, out)
	}
}

func TestBadClientsGetAnErrorAndOthersAreUnaffected(t *testing.T) {
	s := newStack(t, nil)
	// A client that keeps a good connection open throughout.
	keep, err := net.Dial("tcp", s.socks)
	if err != nil {
		t.Fatal(err)
	}
	defer keep.Close()
	if _, err := keep.Write([]byte{5, 1, 0, 5, 1, 0, 1, 127, 77, 0, 1, 0x23, 0x8c}); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(keep)
	hdr := make([]byte, 12)
	if _, err := io.ReadFull(r, hdr); err != nil || hdr[3] != 0 {
		t.Fatalf("good socks client: %v %x", err, hdr)
	}

	// Each bad client gets exactly its answer and a close, well before the
	// handshake deadline: a proxy that hangs on one fails here in 2s.
	// (Clients that stall mid-message are in the fake-clock table of
	// TestSOCKSClientsGetTheExactAnswerAndAClose.)
	ok := []byte{5, 0}
	for _, bad := range []struct {
		name      string
		raw       []byte
		halfClose bool
		want      []byte
	}{
		{"malformed greeting", []byte("GET / HTTP/1.1\r\n\r\n"), false, nil},
		{"truncated request", []byte{5, 1, 0, 5, 1, 0, 1, 127}, true, ok},
		{"unknown address", []byte{5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80}, false, append(ok, socksReply(repAddrNotSupported)...)},
		{"bind", []byte{5, 1, 0, 5, 2, 0, 1, 127, 77, 0, 1, 0x23, 0x8c}, false, append(ok, socksReply(repCommandNotSupported)...)},
		{"udp associate", []byte{5, 1, 0, 5, 3, 0, 1, 127, 77, 0, 1, 0x23, 0x8c}, false, append(ok, socksReply(repCommandNotSupported)...)},
	} {
		c, err := net.Dial("tcp", s.socks)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(bad.raw); err != nil {
			t.Fatalf("%s: write: %v", bad.name, err)
		}
		if bad.halfClose {
			_ = c.(*net.TCPConn).CloseWrite()
		}
		resp, err := readUntilClosed(c, 2*time.Second)
		c.Close()
		if err != nil {
			t.Errorf("%s: the proxy did not close the connection: %v (got %x)", bad.name, err, resp)
		}
		if !bytes.Equal(resp, bad.want) {
			t.Errorf("%s: the proxy answered %x, want exactly %x", bad.name, resp, bad.want)
		}
	}
	// An oversized header to the HTTP proxy.
	c, err := net.Dial("tcp", s.http)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "GET http://%s/ HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n", target, target, strings.Repeat("a", 64<<10))
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if !strings.HasPrefix(resp, "HTTP/1.1 431 ") {
		t.Errorf("oversized header: want 431, got %q", resp)
	}

	// The connection opened before all this still works, and new clients too.
	fmt.Fprintf(keep, "GET / HTTP/1.0\r\n\r\n")
	body, _ := io.ReadAll(r)
	if !strings.Contains(string(body), "agent-a1") {
		t.Fatalf("the existing client was disturbed: %q", body)
	}
	if out, err := curl(t, "--socks5", s.socks, "http://"+target+"/"); err != nil || out != "agent-a1" {
		t.Fatalf("a new client after bad ones: %v %q", err, out)
	}
}

// readUntilClosed reads c until the proxy closes it (EOF or a reset) and
// fails with the deadline error if it does not within d.
func readUntilClosed(c net.Conn, d time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return b, err
	}
	return b, nil
}

func TestFailoverToTheOtherBackend(t *testing.T) {
	s := newStack(t, nil)
	// A third, live-looking backend that refuses every connection: the
	// proxy must fall back to a working one each time it picks it first.
	ctx := context.Background()
	closed := testutil.FreePort(t)
	_ = s.reg.RenewPS(ctx, registry.PSLease{ID: "ps-refusing", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: time.Now().Add(time.Minute)})
	if errs, err := s.reg.Publish(ctx, "ps-refusing", []registry.Publication{{Target: netip.MustParseAddrPort(target), Port: uint16(closed), AgentID: "a1"}}); err != nil || errs[0] != nil {
		t.Fatal(err, errs)
	}
	tunneltest.WaitBackends(t, s.reg, netip.MustParseAddrPort(target), 3)
	for i := range 15 {
		if out, err := curl(t, "--socks5", s.socks, "http://"+target+"/"); err != nil || out != "agent-a1" {
			t.Fatalf("request %d with a refusing backend: %v %q", i, err, out)
		}
	}
	// One real PS goes away too: requests keep succeeding through the other.
	s.ps[0].Stop()
	for i := range 15 {
		if out, err := curl(t, "-x", "http://"+s.http, "http://"+target+"/"); err != nil || out != "agent-a1" {
			t.Fatalf("request %d with ps1 gone: %v %q", i, err, out)
		}
	}
}

func TestUsernamePasswordIsRequiredWhenConfigured(t *testing.T) {
	auth := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(auth, []byte("ops:s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := newStack(t, func(c *Config) { c.AuthFile = auth })
	// A refusal is an answer, not a timeout: curl must say why.
	if out, err := curl(t, "--socks5", s.socks, "http://"+target+"/"); err == nil || !strings.Contains(out, "No authentication method was acceptable") {
		t.Fatalf("no credentials: want the proxy to refuse every method, got %v %q", err, out)
	}
	if out, err := curl(t, "--socks5", "ops:wrong@"+s.socks, "http://"+target+"/"); err == nil || !strings.Contains(out, "User was rejected by the SOCKS5 server (1 1)") {
		t.Fatalf("a wrong password: want the proxy to reject the user, got %v %q", err, out)
	}
	if out, err := curl(t, "--socks5", "ops:s3cret@"+s.socks, "http://"+target+"/"); err != nil || out != "agent-a1" {
		t.Fatalf("right credentials: %v %q", err, out)
	}
	if out, _ := curl(t, "-o", "/dev/null", "-w", "%{http_code}", "-x", "http://"+s.http, "http://"+target+"/"); out != "407" {
		t.Fatalf("http without credentials: want 407, got %q", out)
	}
	if out, err := curl(t, "-x", "http://ops:s3cret@"+s.http, "http://"+target+"/"); err != nil || out != "agent-a1" {
		t.Fatalf("http with credentials: %v %q", err, out)
	}
}

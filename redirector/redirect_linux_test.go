package redirector_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel/tunneltest"
)

// The agent's address in these tests: nothing listens there, so without
// redirection a connect is refused.
const (
	agentIP  = "127.77.0.1"
	httpPort = 9100
	echoPort = 9101
)

var tetherBin string

func TestMain(m *testing.M) {
	// The test binary doubles as a Go client started inside the test cgroup.
	if mode := os.Getenv("TETHER_TEST_CLIENT"); mode != "" {
		os.Exit(clientMain(mode, os.Args[len(os.Args)-1]))
	}
	dir, err := os.MkdirTemp("", "tether-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tetherBin = filepath.Join(dir, "tether")
	if out, err := exec.Command("go", "build", "-o", tetherBin, "../cmd/tether").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build tether: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// clientMain is a plain Go client: "dial" connects once and prints the peer
// as getpeername() reports it and the answer; "loop" connects again and again
// for a while and prints how many attempts failed; "hold" opens connections
// to an echo endpoint, waits for a line on stdin, then reports per
// connection whether it still works.
func clientMain(mode, addr string) int {
	switch mode {
	case "dial":
		c, err := net.DialTimeout("tcp", addr, 3*time.Second)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		defer c.Close()
		fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
		body, _ := io.ReadAll(c)
		fmt.Printf("peer=%s\n%s", peerOf(c), body)
		return 0
	case "loop":
		deadline := time.Now().Add(4 * time.Second)
		var ok, failed int
		var lastErr error
		for time.Now().Before(deadline) {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				_, err = fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
				if err == nil {
					var b []byte
					b, err = io.ReadAll(c)
					if err == nil && !bytes.Contains(b, []byte("agent-a1")) {
						err = fmt.Errorf("wrong answer %q", b)
					}
				}
				c.Close()
			}
			if err != nil {
				failed++
				lastErr = err
			} else {
				ok++
			}
			time.Sleep(5 * time.Millisecond)
		}
		fmt.Printf("ok=%d failed=%d last_error=%v\n", ok, failed, lastErr)
		return 0
	case "hold":
		var conns []net.Conn
		for range 20 {
			c, err := net.DialTimeout("tcp", addr, 3*time.Second)
			if err != nil {
				fmt.Println("error:", err)
				return 1
			}
			conns = append(conns, c)
		}
		fmt.Println("held")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		for i, c := range conns {
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			_, err := c.Write([]byte("ping\n"))
			if err == nil {
				buf := make([]byte, 5)
				_, err = io.ReadFull(c, buf)
			}
			if err != nil {
				fmt.Printf("conn %d: error %v\n", i, err)
			} else {
				fmt.Printf("conn %d: ok\n", i)
			}
		}
		return 0
	}
	return 2
}

func peerOf(c net.Conn) string {
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err.Error()
	}
	var out string
	_ = rc.Control(func(fd uintptr) {
		sa, err := unix.Getpeername(int(fd))
		switch a := sa.(type) {
		case *unix.SockaddrInet4:
			out = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
		case *unix.SockaddrInet6:
			out = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
		default:
			out = fmt.Sprintf("%v %v", sa, err)
		}
	})
	return out
}

// stack is a Redis, two PS processes, an agent exposing agentIP:9100 (HTTP
// answering "agent-a1") and agentIP:9101 (echo), and a cgroup.
type stack struct {
	t      *testing.T
	redis  *testutil.Redis
	reg    *registry.Registry
	ps     []*exec.Cmd
	psLogs []*bytes.Buffer
	cg     *testutil.Cgroup
	pinDir string
}

func newStack(t *testing.T) *stack {
	testutil.RequirePrivileged(t)
	s := &stack{t: t, redis: testutil.StartRedis(t), cg: testutil.NewCgroup(t)}
	s.reg = tunneltest.NewRegistry(t, s.redis.URL())
	s.pinDir = filepath.Join("/sys/fs/bpf", testutil.UniqueName("tt"))
	t.Cleanup(func() {
		if err := redirector.Uninstall(s.pinDir); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})

	httpAddr := startHTTP(t, "agent-a1")
	echoAddr := startEcho(t)
	var servers []string
	for i := range 2 {
		listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
		servers = append(servers, listen)
		var log bytes.Buffer
		cmd := exec.Command(tetherBin, "ps", "--id", fmt.Sprintf("ps%d", i+1), "--listen", listen,
			"--advertise", "127.0.0.1", "--ports", tunneltest.FreeRange(t, 20), "--redis", s.redis.URL(),
			"--lease", "2s", "--renew", "400ms", "--drain-timeout", "1s")
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		s.ps = append(s.ps, cmd)
		s.psLogs = append(s.psLogs, &log)
		t.Cleanup(func() {
			_ = cmd.Process.Signal(syscall.SIGCONT)
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			if t.Failed() {
				t.Logf("ps%d log:\n%s", i+1, log.String())
			}
		})
	}
	for _, a := range servers {
		testutil.WaitTCP(t, a, 10*time.Second)
	}
	tunneltest.StartAgent(t, "a1", agentIP, servers, []string{
		fmt.Sprintf("%d=%s", httpPort, httpAddr), fmt.Sprintf("%d=%s", echoPort, echoAddr),
	}, nil)
	tunneltest.WaitBackends(t, s.reg, netip.MustParseAddrPort(fmt.Sprintf("%s:%d", agentIP, httpPort)), 2)
	tunneltest.WaitBackends(t, s.reg, netip.MustParseAddrPort(fmt.Sprintf("%s:%d", agentIP, echoPort)), 2)
	return s
}

// startRedirector runs the redirector in this process until the test ends
// and returns its log.
func (s *stack) startRedirector(mods ...func(*redirector.Config)) *tunneltest.LogBuf {
	s.t.Helper()
	cfg := redirector.DefaultConfig()
	cfg.Redis = s.redis.URL()
	cfg.Cgroup = s.cg.Path
	cfg.PinDir = s.pinDir
	cfg.MapSize = 10000
	log, lb := tunneltest.NewLog(s.t, "redirector")
	cfg.Logger = log
	for _, m := range mods {
		m(&cfg)
	}
	r, err := redirector.New(cfg)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = r.Run(ctx); close(done) }()
	s.t.Cleanup(func() {
		cancel()
		<-done
		r.Close()
		if s.t.Failed() {
			s.t.Logf("redirector log:\n%s", lb.String())
		}
	})
	select {
	case <-r.Ready():
	case <-time.After(10 * time.Second):
		s.t.Fatal("redirector never synced")
	}
	return lb
}

// inCgroup runs a command inside the test cgroup.
func (s *stack) inCgroup(env []string, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	done := s.cg.Command(s.t, cmd)
	defer done()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (s *stack) goClient(mode, addr string) (string, error) {
	return s.inCgroup([]string{"TETHER_TEST_CLIENT=" + mode}, os.Args[0], "-test.run=^$", addr)
}

func (s *stack) counters() map[string]uint64 {
	st, err := redirector.ReadStatus(s.pinDir)
	if err != nil {
		s.t.Fatal(err)
	}
	return st.Counters
}

func startHTTP(t *testing.T, name string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "%s\n", name)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func startEcho(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

var target = fmt.Sprintf("%s:%d", agentIP, httpPort)

func TestUnmodifiedClientsInTheCgroupReachTheAgentByItsOwnIP(t *testing.T) {
	curl := testutil.RequireBinary(t, "curl")
	python := testutil.RequireBinary(t, "python3")
	s := newStack(t)
	s.startRedirector()

	out, err := s.inCgroup(nil, curl, "-sS", "--max-time", "5", "http://"+target+"/")
	if err != nil || strings.TrimSpace(out) != "agent-a1" {
		t.Fatalf("curl in the cgroup: %v\n%s", err, out)
	}

	out, err = s.goClient("dial", target)
	if err != nil || !strings.Contains(out, "peer="+target) || !strings.Contains(out, "agent-a1") {
		t.Fatalf("Go net.Dial in the cgroup must reach the agent and see it as its peer: %v\n%s", err, out)
	}

	script := fmt.Sprintf(`import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(("::ffff:%s", %d))
print("peer=%%s:%%d" %% s.getpeername()[:2])
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b: break
    data += b
print(data.decode().split("\r\n\r\n", 1)[1].strip())
`, agentIP, httpPort)
	out, err = s.inCgroup(nil, python, "-c", script)
	if err != nil || !strings.Contains(out, fmt.Sprintf("peer=::ffff:%s:%d", agentIP, httpPort)) || !strings.Contains(out, "agent-a1") {
		t.Fatalf("Python AF_INET6 to ::ffff:%s: %v\n%s", agentIP, err, out)
	}

	// Outside the cgroup nothing changes: the agent's address is not there.
	if out, err := exec.Command(curl, "-sS", "--max-time", "3", "http://"+target+"/").CombinedOutput(); err == nil {
		t.Fatalf("curl outside the cgroup must fail, got %s", out)
	}

	// A destination without a route is left alone.
	plain := startHTTP(t, "plain")
	before := s.counters()
	out, err = s.inCgroup(nil, curl, "-sS", "--max-time", "5", "http://"+plain+"/")
	if err != nil || strings.TrimSpace(out) != "plain" {
		t.Fatalf("a destination without a route must be untouched: %v\n%s", err, out)
	}
	after := s.counters()
	if after["no_route"] <= before["no_route"] || after["redirected"] != before["redirected"] {
		t.Fatalf("counters: before %v after %v", before, after)
	}
	if after["redirected"] < 3 || after["getpeername_rewritten"] < 2 {
		t.Fatalf("redirected/getpeername counters did not move: %v", after)
	}

	// bpftool prints the pinned maps readably, thanks to BTF.
	if bpftool, err := exec.LookPath("bpftool"); err == nil {
		dump, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(s.pinDir, "tether_routes")).CombinedOutput()
		if err != nil || !strings.Contains(string(dump), `"backends"`) || !strings.Contains(string(dump), `"state": 1`) {
			t.Fatalf("bpftool map dump: %v\n%s", err, dump)
		}
	} else {
		testutil.RequireBinary(t, "bpftool")
	}
}

func TestDeadBackendsStopGettingConnectionsAndTheirSocketsAreDestroyed(t *testing.T) {
	t.Run("bpf_sock_destroy", func(t *testing.T) { testDeadBackends(t, false) })
	t.Run("netlink SOCK_DESTROY fallback", func(t *testing.T) { testDeadBackends(t, true) })
}

func testDeadBackends(t *testing.T, netlinkFallback bool) {
	s := newStack(t)
	var mods []func(*redirector.Config)
	if netlinkFallback {
		mods = append(mods, redirector.ForceNetlinkDestroy)
	}
	rlog := s.startRedirector(mods...)
	echo := fmt.Sprintf("%s:%d", agentIP, echoPort)

	// Twenty long-lived connections from inside the cgroup, spread over both PS.
	hold := exec.Command(os.Args[0], "-test.run=^$", echo)
	hold.Env = append(os.Environ(), "TETHER_TEST_CLIENT=hold")
	stdin, _ := hold.StdinPipe()
	var holdOut bytes.Buffer
	pr, pw := io.Pipe()
	hold.Stdout = io.MultiWriter(&holdOut, pw)
	done := s.cg.Command(t, hold)
	if err := hold.Start(); err != nil {
		t.Fatal(err)
	}
	done()
	line, _ := bufio.NewReader(pr).ReadString('\n')
	if strings.TrimSpace(line) != "held" {
		t.Fatalf("client could not open its connections: %q", line)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()

	// ps1 freezes: no RST, no FIN. Once its lease lapses, the redirector
	// marks it dead and destroys the sockets that went through it.
	if err := s.ps[0].Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "sockets through the frozen PS destroyed", func() error {
		if !strings.Contains(rlog.String(), "destroyed client sockets of dead backends") {
			return fmt.Errorf("none destroyed yet")
		}
		return nil
	})
	if !netlinkFallback && s.counters()["sockets_destroyed"] == 0 {
		t.Fatal("the sockets_destroyed counter did not move")
	}
	_, _ = io.WriteString(stdin, "go\n")
	_ = hold.Wait()
	pw.Close()
	report := holdOut.String()
	okN, errN := strings.Count(report, ": ok"), strings.Count(report, ": error")
	// 20 connections spread at random: all on one PS has odds of 2 in 10^6.
	if okN+errN != 20 || errN == 0 || okN == 0 {
		t.Fatalf("want some connections cut (through ps1) and the others working (ps2):\n%s", report)
	}
	// A destroyed socket fails at once (connection aborted); one left to
	// hang on the frozen PS would end in the client's own timeout.
	if strings.Contains(report, "i/o timeout") {
		t.Fatalf("a connection through the frozen PS was left hanging instead of destroyed:\n%s", report)
	}
	t.Logf("after freezing ps1: %d held connections destroyed, %d still working", errN, okN)

	// New connections all go to the live PS.
	for i := range 10 {
		if out, err := s.goClient("dial", target); err != nil || !strings.Contains(out, "agent-a1") {
			t.Fatalf("connection %d after ps1 died: %v\n%s", i, err, out)
		}
	}

	// Every backend dead: connect fails at once with EHOSTUNREACH.
	if err := s.ps[1].Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// "no route to host" comes from the program; a connect left alone would
	// hang until the client's timeout instead ("i/o timeout").
	testutil.Eventually(t, 10*time.Second, "connect fails with EHOSTUNREACH", func() error {
		out, _ := s.goClient("dial", target)
		if !strings.Contains(out, "no route to host") {
			return fmt.Errorf("got %q", out)
		}
		return nil
	})
	if s.counters()["no_live_backend"] == 0 {
		t.Fatal("no_live_backend counter did not move")
	}
	for _, p := range s.ps {
		_ = p.Process.Signal(syscall.SIGCONT)
	}
}

func TestAWithdrawnRouteIsNoLongerRedirected(t *testing.T) {
	s := newStack(t)
	s.startRedirector()
	if out, err := s.goClient("dial", target); err != nil {
		t.Fatalf("before withdraw: %v\n%s", err, out)
	}
	// Both PS drain (SIGTERM): they withdraw every route.
	for _, p := range s.ps {
		_ = p.Process.Signal(syscall.SIGTERM)
		_ = p.Wait()
	}
	testutil.Eventually(t, 10*time.Second, "route gone from the map", func() error {
		st, err := redirector.ReadStatus(s.pinDir)
		if err != nil {
			return err
		}
		if st.Routes != 0 {
			return fmt.Errorf("%d routes in the map", st.Routes)
		}
		return nil
	})
	out, _ := s.goClient("dial", target)
	if !strings.Contains(out, "connection refused") {
		t.Fatalf("without a route the connect must go to the real address (refused): %s", out)
	}
}

func TestRedirectorRestartDropsNoConnection(t *testing.T) {
	s := newStack(t)
	start := func() *exec.Cmd {
		cmd := exec.Command(tetherBin, "redirector", "--redis", s.redis.URL(), "--cgroup", s.cg.Path,
			"--pin-dir", s.pinDir, "--map-size", "10000")
		var log bytes.Buffer
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			if t.Failed() {
				t.Logf("redirector log:\n%s", log.String())
			}
		})
		return cmd
	}
	first := start()
	testutil.Eventually(t, 10*time.Second, "first redirector synced", func() error {
		st, err := redirector.ReadStatus(s.pinDir)
		if err != nil {
			return err
		}
		if st.Routes != 2 {
			return fmt.Errorf("%d routes", st.Routes)
		}
		return nil
	})

	type result struct {
		out string
		err error
	}
	res := make(chan result, 1)
	go func() {
		out, err := s.goClient("loop", target)
		res <- result{out, err}
	}()
	time.Sleep(500 * time.Millisecond) // let the loop get going (not a synchronisation)
	_ = first.Process.Kill()
	_ = first.Wait()
	second := start()
	r := <-res
	if r.err != nil || !strings.Contains(r.out, "failed=0 ") || strings.Contains(r.out, "ok=0 ") {
		t.Fatalf("client loop across a redirector restart: %v\n%s", r.err, r.out)
	}
	t.Logf("FIGURE redirector_restart_failed_connections=0 (%s)", strings.TrimSpace(r.out))

	_ = second.Process.Signal(syscall.SIGTERM)
	_ = second.Wait()
	out, err := exec.Command(tetherBin, "redirector", "uninstall", "--cgroup", s.cg.Path, "--pin-dir", s.pinDir).CombinedOutput()
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if _, err := os.Stat(s.pinDir); !os.IsNotExist(err) {
		t.Fatalf("pins left behind: %v", err)
	}
	if bpftool, err := exec.LookPath("bpftool"); err == nil {
		show, _ := exec.Command(bpftool, "cgroup", "show", s.cg.Path).CombinedOutput()
		if strings.Contains(string(show), "tether") || strings.Contains(string(show), "connect") {
			t.Fatalf("programs still attached after uninstall:\n%s", show)
		}
	}
	if out, _ := s.goClient("dial", target); !strings.Contains(out, "connection refused") {
		t.Fatalf("after uninstall the connect must not be redirected: %s", out)
	}
}

package redirector_test

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
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
	flag.Parse()
	if testing.Short() {
		// Only unprivileged tests run under -short; none needs the binary.
		os.Exit(m.Run())
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

// Every read and dial in these tests has a deadline: a regression must show
// up as a failure that names it, not as the package's timeout.
const (
	dialTimeout = 3 * time.Second
	ioTimeout   = 5 * time.Second
	// clientTimeout bounds a client process from start to exit.
	clientTimeout = time.Minute
)

// clientMain is a plain Go client: "dial" connects once and prints the peer
// as getpeername() reports it and the answer; "loop" connects again and
// again, prints "running" once a few requests have succeeded, and when a
// line (or EOF) arrives on stdin prints how many attempts failed; "hold"
// opens connections to an echo endpoint, prints "held", waits for a line on
// stdin, then reports per connection whether it still works.
func clientMain(mode, addr string) int {
	switch mode {
	case "dial":
		c, err := net.DialTimeout("tcp", addr, dialTimeout)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
		body, err := io.ReadAll(c)
		fmt.Printf("peer=%s\n%s", peerOf(c), body)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		return 0
	case "loop":
		stop := make(chan struct{})
		go func() { _, _ = bufio.NewReader(os.Stdin).ReadString('\n'); close(stop) }()
		giveUp := time.After(clientTimeout)
		var ok, failed int
		var lastErr error
		for {
			select {
			case <-stop:
				fmt.Printf("ok=%d failed=%d last_error=%v\n", ok, failed, lastErr)
				return 0
			case <-giveUp:
				fmt.Printf("error: never told to stop; ok=%d failed=%d last_error=%v\n", ok, failed, lastErr)
				return 1
			default:
			}
			if err := ask(addr, "agent-a1"); err != nil {
				failed++
				lastErr = err
			} else if ok++; ok == 5 {
				fmt.Println("running")
			}
			time.Sleep(5 * time.Millisecond)
		}
	case "hold":
		var conns []net.Conn
		for range 20 {
			c, err := net.DialTimeout("tcp", addr, dialTimeout)
			if err != nil {
				fmt.Println("error:", err)
				return 1
			}
			conns = append(conns, c)
		}
		fmt.Println("held")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		for i, c := range conns {
			_ = c.SetDeadline(time.Now().Add(dialTimeout))
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
	case "intent":
		return intentClientMain(addr)
	case "health":
		return redirector.HealthClientMain(addr)
	}
	return 2
}

// ask makes one HTTP/1.0 request to addr and checks the answer names want.
func ask(addr, want string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if !bytes.Contains(b, []byte(want)) {
		return fmt.Errorf("wrong answer %q", b)
	}
	return nil
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
	// servers are the PS nodes' tunnel addresses, for more agents.
	servers []string
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
	// Credentials as in production: the test token for any agent id, and
	// the agents' loopback range named, as loopback is refused unless named.
	tokens := tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n")
	for i := range 2 {
		listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
		servers = append(servers, listen)
		var log bytes.Buffer
		cmd := exec.Command(tetherBin, "ps", "--id", fmt.Sprintf("ps%d", i+1), "--listen", listen,
			"--advertise", "127.0.0.1", "--ports", tunneltest.FreeRange(t, 20), "--redis", s.redis.URL(),
			"--lease", "2s", "--renew", "400ms", "--drain-timeout", "1s",
			"--token-file", tokens, "--agent-cidrs", tunneltest.AgentRange)
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
	s.servers = servers
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
	cfg.TargetCIDRs = []string{testTargetCIDRs}
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

// inCgroup runs a command inside the test cgroup; one that outlives
// clientTimeout is killed.
func (s *stack) inCgroup(env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = time.Second
	done := s.cg.Command(s.t, cmd)
	defer done()
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s killed after %v: %w", name, clientTimeout, err)
	}
	return string(out), err
}

// client is a Go client process (a clientMain mode) running in the test
// cgroup, talked to line by line.
type client struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	out   *tunneltest.LogBuf
	gone  chan struct{} // closed once the process has exited
	err   error         // its exit status, once gone is closed
}

// startClient starts clientMain's mode inside the test cgroup; it is killed
// at the end of the test if still running.
func (s *stack) startClient(mode, addr string) *client {
	s.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$", addr)
	cmd.Env = append(os.Environ(), "TETHER_TEST_CLIENT="+mode)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		s.t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		s.t.Fatal(err)
	}
	c := &client{cmd: cmd, stdin: stdin, lines: make(chan string, 1000), out: &tunneltest.LogBuf{}, gone: make(chan struct{})}
	cmd.Stderr = c.out
	done := s.cg.Command(s.t, cmd)
	err = cmd.Start()
	done()
	if err != nil {
		s.t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			fmt.Fprintln(c.out, sc.Text())
			select {
			case c.lines <- sc.Text():
			default:
			}
		}
		close(c.lines)
		c.err = cmd.Wait()
		close(c.gone)
	}()
	s.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-c.gone
	})
	return c
}

// waitLine waits until the client prints want.
func (c *client) waitLine(want string, timeout time.Duration) error {
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				return fmt.Errorf("client exited before printing %q:\n%s", want, c.out.String())
			}
			if l == want {
				return nil
			}
		case <-deadline:
			return fmt.Errorf("client did not print %q in %v:\n%s", want, timeout, c.out.String())
		}
	}
}

// finish tells the client to go on (a line on stdin) and returns all it
// printed once it exits; a client that does not exit in time is killed.
func (c *client) finish() (string, error) {
	_, _ = io.WriteString(c.stdin, "go\n")
	_ = c.stdin.Close()
	select {
	case <-c.gone:
		return c.out.String(), c.err
	case <-time.After(clientTimeout):
		_ = c.cmd.Process.Kill()
		return c.out.String(), fmt.Errorf("client did not exit in %v", clientTimeout)
	}
}

// mapRoute reads target's entry in the pinned route map.
func (s *stack) mapRoute(target netip.AddrPort) (bpf.RedirectRouteValue, error) {
	var v bpf.RedirectRouteValue
	m, err := ebpf.LoadPinnedMap(filepath.Join(s.pinDir, bpf.RedirectMapTetherRoutes), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return v, err
	}
	defer m.Close()
	k, ok := redirector.EncodeKey(target)
	if !ok {
		return v, fmt.Errorf("%s has no route map key", target)
	}
	if err := m.Lookup(&k, &v); err != nil {
		return v, fmt.Errorf("look up %s: %w", target, err)
	}
	return v, nil
}

// waitExit waits for cmd to exit and returns its status; one still running
// after timeout is killed.
func waitExit(cmd *exec.Cmd, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("still running after %v (killed)", timeout)
	}
}

func (s *stack) goClient(mode, addr string) (string, error) {
	return s.inCgroup([]string{"TETHER_TEST_CLIENT=" + mode}, os.Args[0], "-test.run=^$", addr)
}

// waitRoutes waits until the pinned route map holds n routes.
func (s *stack) waitRoutes(n int, what string) {
	s.t.Helper()
	testutil.Eventually(s.t, 10*time.Second, what, func() error {
		st, err := redirector.ReadStatus(s.pinDir)
		if err != nil {
			return err
		}
		if st.Routes != n {
			return fmt.Errorf("%d routes in the map", st.Routes)
		}
		return nil
	})
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
			go func() {
				_ = c.SetDeadline(time.Now().Add(clientTimeout))
				_, _ = io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	return ln.Addr().String()
}

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
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

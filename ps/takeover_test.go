package ps_test

import (
	"bufio"
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
)

// namedEcho serves "NAME:" and then echoes every line back until EOF: the
// client learns which agent process carried it, and can keep the
// connection busy as long as it likes.
func namedEcho(t *testing.T, name string) string {
	return tunneltest.Serve(t, func(c *net.TCPConn) {
		if _, err := io.WriteString(c, name+":"); err != nil {
			return
		}
		_, _ = io.Copy(c, c)
	})
}

// whoAnswers connects to addr and returns the name its server announced.
func whoAnswers(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	name, err := bufio.NewReader(c).ReadString(':')
	return strings.TrimSuffix(name, ":"), err
}

// A rolling agent restart: a second agent process with the same id and
// credential (a newer epoch) takes the agent's port over on this PS. New
// client connections reach the new process at once, while a connection
// that was in flight on the old one keeps working, with correct data,
// until its client ends it; then the PS closes the old session.
func TestTakeoverLetsInFlightStreamsFinish(t *testing.T) {
	rd := testutil.StartRedis(t)
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) { c.DrainTimeout = 20 * time.Second })
	reg := tunneltest.NewRegistry(t, rd.URL())
	oldSvc, newSvc := namedEcho(t, "old"), namedEcho(t, "new")
	one := func(c *agent.Config) { c.Tunnels = 1 }
	_, _, stopOld := tunneltest.StartAgent(t, "a1", "127.77.0.7", []string{node.Addr}, []string{"9100=" + oldSvc}, one)
	target := netip.MustParseAddrPort("127.77.0.7:9100")
	port := tunneltest.WaitBackends(t, reg, target, 1)[0].Address.String()

	// A long-running connection through the old agent process.
	c, err := net.Dial("tcp", port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	rd1 := bufio.NewReader(c)
	if name, err := rd1.ReadString(':'); err != nil || name != "old:" {
		t.Fatalf("in-flight connection: greeting %q, %v", name, err)
	}
	exchange := func(i int) {
		t.Helper()
		line := fmt.Sprintf("line %d %s\n", i, strings.Repeat("x", 1000+i))
		if _, err := io.WriteString(c, line); err != nil {
			t.Fatalf("in-flight connection, write %d: %v", i, err)
		}
		got, err := rd1.ReadString('\n')
		if err != nil || got != line {
			t.Fatalf("in-flight connection, line %d: got %d bytes (%v), want the %d sent", i, len(got), err, len(line))
		}
	}
	exchange(0)

	// The new process: same id, same credential, a newer epoch.
	newAgent, _, _ := tunneltest.StartAgent(t, "a1", "127.77.0.7", []string{node.Addr}, []string{"9100=" + newSvc}, one)
	select {
	case <-newAgent.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("the new agent process never got its tunnel")
	}
	took := time.Now()
	testutil.Eventually(t, 5*time.Second, "new connections reach the new process", func() error {
		if name, err := whoAnswers(port); err != nil || name != "new" {
			return fmt.Errorf("answered by %q, %v", name, err)
		}
		return nil
	})
	// The route did not move: the new session took the old one's port.
	if be := tunneltest.WaitBackends(t, reg, target, 1)[0]; be.Address.String() != port {
		t.Fatalf("route moved from %s to %s on takeover", port, be.Address)
	}

	// The old connection keeps working for a while after the takeover.
	for i := 1; i <= 20; i++ {
		exchange(i)
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(node.Log.String(), "newer session supersedes the old one") {
		t.Fatal("the ps did not log the takeover")
	}
	if strings.Contains(node.Log.String(), "superseded session closed") {
		t.Fatal("the ps closed the old session while a connection was in flight on it")
	}
	// The client ends it: the echo's FIN comes back after the last byte.
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(rd1); err != nil || len(rest) != 0 {
		t.Fatalf("after the client's FIN: %q, %v; want a clean EOF", rest, err)
	}
	t.Logf("in-flight connection ran %v after the takeover and ended cleanly", time.Since(took).Round(time.Millisecond))
	testutil.Eventually(t, 5*time.Second, "the ps closes the old session once its connection ended", func() error {
		if !strings.Contains(node.Log.String(), "superseded session closed after its in-flight streams ended") {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	stopOld()
	// And the new process keeps serving.
	if name, err := whoAnswers(port); err != nil || name != "new" {
		t.Fatalf("after the old session closed: answered by %q, %v", name, err)
	}
}

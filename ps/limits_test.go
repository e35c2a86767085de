package ps_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/tunnel"
)

// What a hostile peer can make the PS hold once a tunnel is up: streams an
// agent opens, client connections on data ports (how many, how long idle,
// what each costs). Each limit is counted in a metric with its reason.

// echoEnv is a PS with one agent exposing echo servers.
type echoEnv struct {
	ps      *tunneltest.PSNode
	metrics *prometheus.Registry
	ports   []string // the data-port address of each exposed echo server
}

// startEcho runs a PS (with mod applied) and agent a1 exposing n echo
// servers on 127.77.0.1:9100, 9101, ...
func startEcho(t *testing.T, n int, mod func(*ps.Config)) *echoEnv {
	t.Helper()
	rd := testutil.StartRedis(t)
	metrics := prometheus.NewRegistry()
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) {
		c.Registerer = metrics
		if mod != nil {
			mod(c)
		}
	})
	reg := tunneltest.NewRegistry(t, rd.URL())
	echo := tunneltest.Serve(t, func(c *net.TCPConn) {
		// A small buffer: the server's memory counts in the figures of
		// TestIdleClientConnectionsCostKilobytes.
		_, _ = io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 4096))
	})
	var expose []string
	for i := range n {
		expose = append(expose, fmt.Sprintf("%d=%s", 9100+i, echo))
	}
	tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{node.Addr}, expose, func(c *agent.Config) { c.Tunnels = 1 })
	env := &echoEnv{ps: node, metrics: metrics}
	for i := range n {
		be := tunneltest.WaitBackends(t, reg, netip.MustParseAddrPort(fmt.Sprintf("127.77.0.1:%d", 9100+i)), 1)[0]
		env.ports = append(env.ports, be.Address.String())
	}
	return env
}

func (e *echoEnv) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	return testutil.MetricValue(t, e.metrics, name, labels...)
}

// echoConn connects to addr and checks that a byte makes the round trip,
// so the connection is carried end to end; the caller closes it.
func echoConn(addr string) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if err := roundTrip(c, 1); err != nil {
		c.Close()
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// roundTrip sends n bytes and reads them back.
func roundTrip(c net.Conn, n int) error {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	msg := make([]byte, n)
	for i := range msg {
		msg[i] = byte(i)
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Write(msg); errc <- err }()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("echo of %d bytes: %w", n, err)
	}
	return <-errc
}

// refused connects to addr and checks that the PS resets the connection
// without carrying it.
func refused(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil // refused even earlier
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = c.Write([]byte("x"))
	n, err := c.Read(make([]byte, 1))
	if n > 0 {
		return errors.New("the connection was carried: the echo answered")
	}
	if isTimeout(err) {
		return errors.New("the connection was neither carried nor closed within 10s")
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// memFigures is what the process holds: goroutines, heap and goroutine
// stacks in use, after two collections.
type memFigures struct {
	goroutines   int
	heap, stacks uint64
}

func measure() memFigures {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memFigures{runtime.NumGoroutine(), ms.HeapInuse, ms.StackInuse}
}

// 1,000 client connections that carried a little data and then sit idle
// cost kilobytes each on the PS and the agent, not the 2 x 256 KiB buffers
// per relay (on each side) they used to hold, and a bounded number of
// goroutines. Some of them carried a burst first: the large buffers and
// yamux's receive buffers go back once they are quiet.
func TestIdleClientConnectionsCostKilobytes(t *testing.T) {
	const conns, bursts, burst = 1000, 50, 512 << 10
	env := startEcho(t, 1, nil)
	addr := env.ports[0]
	warm, err := echoConn(addr)
	if err != nil {
		t.Fatal(err)
	}
	warm.Close()
	testutil.Eventually(t, 10*time.Second, "the warm-up connection ends", func() error {
		if n := env.metric(t, "tether_ps_streams_open"); n != 0 {
			return fmt.Errorf("%v streams open", n)
		}
		return nil
	})
	before := measure()

	cs := make([]*net.TCPConn, conns)
	var wg sync.WaitGroup
	var failures atomic.Int64
	var firstErr atomic.Value
	work := make(chan int)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				c, err := echoConn(addr)
				if err == nil && i < bursts {
					err = roundTrip(c, burst)
				}
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				cs[i] = c
			}
		}()
	}
	for i := range conns {
		work <- i
	}
	close(work)
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range cs {
			if c != nil {
				c.Close()
			}
		}
	})
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d connections failed, first: %v", n, conns, firstErr.Load())
	}
	if n := env.metric(t, "tether_ps_streams_open"); n != conns {
		t.Fatalf("the ps carries %v connections, want %d", n, conns)
	}
	// Quiet connections drop yamux's receive buffers after a second.
	time.Sleep(1500 * time.Millisecond)
	after := measure()

	perConn := func(a, b uint64) float64 { return (float64(a) - float64(b)) / conns / 1024 }
	goroutines := float64(after.goroutines-before.goroutines) / conns
	heap, stacks := perConn(after.heap, before.heap), perConn(after.stacks, before.stacks)
	t.Logf("%d idle connections (%d after a %d KiB echo), ps + agent + echo server in this process: "+
		"%.2f goroutines, %.1f KiB heap, %.1f KiB goroutine stacks per connection (heap %+.1f MiB, stacks %+.1f MiB)",
		conns, bursts, burst>>10, goroutines, heap, stacks,
		(float64(after.heap)-float64(before.heap))/(1<<20), (float64(after.stacks)-float64(before.stacks))/(1<<20))
	// PS: the connection's handler and the relay's second direction;
	// agent: the same; echo server: one.
	if goroutines > 5.5 {
		t.Errorf("%.2f goroutines per idle connection, want at most 5 (2 on the ps, 2 on the agent, 1 echo server)", goroutines)
	}
	if heap > 64 {
		t.Errorf("%.1f KiB of heap per idle connection, want under 64 KiB", heap)
	}

	for _, c := range cs {
		c.Close()
	}
	testutil.Eventually(t, 20*time.Second, "every connection ends on the ps and the agent", func() error {
		if n := env.metric(t, "tether_ps_streams_open"); n != 0 {
			return fmt.Errorf("%v streams open", n)
		}
		if g := runtime.NumGoroutine(); g > before.goroutines+20 {
			return fmt.Errorf("%d goroutines, %d before the connections", g, before.goroutines)
		}
		return nil
	})
}

// --max-conns-per-port: the connection beyond the cap is reset at once
// and counted; once a carried connection ends, a new one is carried.
func TestConnectionsPerPortAreCapped(t *testing.T) {
	env := startEcho(t, 2, func(c *ps.Config) { c.MaxConnsPerPort = 5 })
	full, other := env.ports[0], env.ports[1]
	var held []*net.TCPConn
	for i := range 5 {
		c, err := echoConn(full)
		if err != nil {
			t.Fatalf("connection %d of 5: %v", i+1, err)
		}
		defer c.Close()
		held = append(held, c)
	}
	if err := refused(full); err != nil {
		t.Fatalf("connection 6 on a port capped at 5: %v", err)
	}
	if n := env.metric(t, "tether_ps_conns_refused_total", "reason", "port_limit"); n != 1 {
		t.Fatalf("conns refused (port_limit) = %v, want 1", n)
	}
	// The cap is per port: another port of the same agent is unaffected.
	c, err := echoConn(other)
	if err != nil {
		t.Fatalf("a connection to another port: %v", err)
	}
	c.Close()

	held[0].Close()
	testutil.Eventually(t, 10*time.Second, "a new connection is carried once one ended", func() error {
		c, err := echoConn(full)
		if err != nil {
			return err
		}
		held = append(held, c)
		return nil
	})
	for _, c := range held[1:] {
		if err := roundTrip(c, 100); err != nil {
			t.Fatalf("a carried connection after the refusals: %v", err)
		}
	}
	if n := env.metric(t, "tether_ps_conns_refused_total", "reason", "total_limit"); n != 0 {
		t.Fatalf("conns refused (total_limit) = %v, want 0", n)
	}
}

// --max-conns: the cap counts all data ports together.
func TestConnectionsInTotalAreCapped(t *testing.T) {
	env := startEcho(t, 2, func(c *ps.Config) { c.MaxConns = 5 })
	var held []*net.TCPConn
	for i := range 5 {
		c, err := echoConn(env.ports[i%2])
		if err != nil {
			t.Fatalf("connection %d of 5: %v", i+1, err)
		}
		defer c.Close()
		held = append(held, c)
	}
	for _, addr := range env.ports {
		if err := refused(addr); err != nil {
			t.Fatalf("a connection beyond the total cap of 5, to %s: %v", addr, err)
		}
	}
	if n := env.metric(t, "tether_ps_conns_refused_total", "reason", "total_limit"); n != 2 {
		t.Fatalf("conns refused (total_limit) = %v, want 2", n)
	}
	if n := env.metric(t, "tether_ps_conns_refused_total", "reason", "port_limit"); n != 0 {
		t.Fatalf("conns refused (port_limit) = %v, want 0", n)
	}
	held[0].Close()
	testutil.Eventually(t, 10*time.Second, "a new connection is carried once one ended", func() error {
		c, err := echoConn(env.ports[1])
		if err != nil {
			return err
		}
		c.Close()
		return nil
	})
}

// --idle-timeout closes a connection quiet both ways that long, and
// counts it; a connection with traffic lives on.
func TestIdleTimeoutClosesQuietConnections(t *testing.T) {
	const timeout = 300 * time.Millisecond
	env := startEcho(t, 1, func(c *ps.Config) { c.IdleTimeout = timeout })
	quiet, err := echoConn(env.ports[0])
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	lastByte := time.Now()
	active, err := echoConn(env.ports[0])
	if err != nil {
		t.Fatal(err)
	}
	defer active.Close()

	closed := make(chan time.Duration, 1)
	go func() {
		_ = quiet.SetReadDeadline(time.Now().Add(20 * time.Second))
		_, _ = quiet.Read(make([]byte, 1)) // EOF when the ps closes it
		closed <- time.Since(lastByte)
	}()
	// The active connection talks every 50 ms for seven timeouts.
	for end := time.Now().Add(7 * timeout); time.Now().Before(end); {
		if err := roundTrip(active, 10); err != nil {
			t.Fatalf("the active connection failed after %v: %v", time.Since(lastByte), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case after := <-closed:
		if after < timeout-50*time.Millisecond {
			t.Fatalf("the quiet connection was closed %v after its last byte, before the %v timeout", after, timeout)
		}
		t.Logf("the quiet connection was closed %v after its last byte (timeout %v)", after.Round(time.Millisecond), timeout)
	case <-time.After(20 * time.Second):
		t.Fatal("the quiet connection is still open 20s after its last byte")
	}
	testutil.Eventually(t, 5*time.Second, "the idle close is counted", func() error {
		if n := env.metric(t, "tether_ps_conns_idle_closed_total"); n != 1 {
			return fmt.Errorf("conns idle closed = %v, want 1", n)
		}
		return nil
	})
}

// An agent that opens streams towards the PS (which the protocol never
// does) has its tunnel closed at the first one, and is counted: 1,024 such
// streams, each written to, used to make the PS hold hundreds of MB.
// Another agent's clients see no failure meanwhile.
func TestAgentOpenedStreamsCloseTheTunnel(t *testing.T) {
	env := startEcho(t, 1, nil)
	stopClients := clientLoop(env.ports[0])
	// The loop has made some round trips before the attack.
	time.Sleep(200 * time.Millisecond)

	before := measure()
	var peak atomic.Uint64
	stopSampling := sampleHeap(&peak)
	rogue, closed := rogueAgent(t, env.ps.Addr, &tunnel.Hello{AgentID: "rogue", AgentIP: netip.MustParseAddr("127.77.0.66"),
		Token: tunneltest.Token, Epoch: 1, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.77.0.66:80")}})
	start := time.Now()
	payload := make([]byte, 256<<10) // a stream's initial window
	sent := 0
	_ = rogue.SetWriteDeadline(time.Now().Add(20 * time.Second))
	for i := range 1024 {
		id := uint32(2 * (i + 1)) // the agent's side opens even stream ids
		frames := append(yamuxHeader(yamuxWindowUpdate, yamuxSYN, id, 0), yamuxHeader(yamuxData, 0, id, len(payload))...)
		if _, err := rogue.Write(append(frames, payload...)); err != nil {
			break // the ps closed the tunnel
		}
		sent++
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the ps did not close the tunnel of an agent that opened streams within 10s")
	}
	took := time.Since(start)
	stopSampling()
	after := measure()
	growth := (float64(peak.Load()) - float64(before.heap)) / (1 << 20)
	t.Logf("the rogue agent wrote %d stream opens with 256 KiB each before the ps closed its tunnel, %v after the first; "+
		"peak heap growth %.1f MiB, after GC %+.1f MiB", sent, took.Round(time.Millisecond), growth,
		(float64(after.heap)-float64(before.heap))/(1<<20))
	if growth > 32 {
		t.Errorf("heap grew by %.1f MiB at its peak during the attack, want a few MiB (under 32)", growth)
	}
	testutil.Eventually(t, 5*time.Second, "the violation is counted and logged", func() error {
		if n := env.metric(t, "tether_ps_tunnel_violations_total", "reason", "agent_opened_stream"); n != 1 {
			return fmt.Errorf("violations (agent_opened_stream) = %v, want 1", n)
		}
		log := env.ps.Log.String()
		if !strings.Contains(log, "the agent opened a stream towards the ps") || !strings.Contains(log, "agent_id=rogue") {
			return errors.New("the ps log lacks a warning naming the rogue agent")
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond)
	n, errs := stopClients()
	if len(errs) > 0 {
		t.Fatalf("the legitimate agent's clients saw %d failures in %d round trips, first: %v", len(errs), n, errs[0])
	}
	t.Logf("the legitimate agent's clients made %d round trips without a failure", n)
}

// clientLoop makes echo round trips on fresh connections to addr until
// stopped; stop returns how many it made and the failures.
func clientLoop(addr string) (stop func() (int, []error)) {
	var mu sync.Mutex
	var failures []error
	n := 0
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-done:
				return
			default:
			}
			c, err := echoConn(addr)
			if err == nil {
				err = roundTrip(c, 1000)
				c.Close()
			}
			mu.Lock()
			n++
			if err != nil {
				failures = append(failures, err)
			}
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return func() (int, []error) {
		close(done)
		<-finished
		mu.Lock()
		defer mu.Unlock()
		return n, failures
	}
}

// sampleHeap records the highest HeapInuse seen every few milliseconds
// until the returned function is called.
func sampleHeap(peak *atomic.Uint64) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return func() { close(done); <-finished }
}

// rogueAgent handshakes with the PS as an agent would and returns the
// tunnel, on which the caller speaks yamux by hand so that it can do what
// tether's agent never does; closed is closed when the PS closes the
// tunnel (what the PS sends meanwhile is read and dropped).
func rogueAgent(t *testing.T, addr string, h *tunnel.Hello) (c net.Conn, closed <-chan struct{}) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	body, err := tunnel.EncodeHello(h)
	if err != nil {
		t.Fatal(err)
	}
	// Preamble (magic, version), then the Hello frame: type 1, length.
	msg := append(append([]byte{}, tunnel.Magic[:]...), tunnel.Version, 1)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(body)))
	if _, err := c.Write(append(msg, body...)); err != nil {
		t.Fatal(err)
	}
	var hdr [5]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Fatalf("read the answer to the hello: %v", err)
	}
	answer := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
	if _, err := io.ReadFull(c, answer); err != nil {
		t.Fatal(err)
	}
	if hdr[0] != 2 {
		r, _ := tunnel.DecodeRefuse(answer)
		t.Fatalf("the ps answered the rogue's hello with message type %d (%+v), want a welcome", hdr[0], r)
	}
	if _, err := tunnel.DecodeWelcome(answer); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Time{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(io.Discard, c)
	}()
	return c, done
}

// The yamux frame header (version 0, type, flags, stream id, length), for
// a test that must send what no yamux library would.
const (
	yamuxData         = 0
	yamuxWindowUpdate = 1
	yamuxSYN          = 1
)

func yamuxHeader(typ byte, flags uint16, id uint32, length int) []byte {
	b := []byte{0, typ}
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint32(b, id)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

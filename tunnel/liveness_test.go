package tunnel

import (
	"context"
	"crypto/sha256"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// blackhole is a loopback TCP forwarder between an agent and a PS. After
// cut it forwards nothing in either direction and closes nothing: what it
// reads it drops, as a router that drops every packet of a vanished host
// (the senders' writes keep succeeding, nothing ever answers).
type blackhole struct {
	addr string
	cut  atomic.Bool
}

func newBlackhole(t *testing.T, target string) *blackhole {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bh := &blackhole{addr: ln.Addr().String()}
	var conns []net.Conn
	var mu sync.Mutex
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, in, out)
			mu.Unlock()
			go bh.forward(out, in)
			go bh.forward(in, out)
		}
	}()
	return bh
}

func (bh *blackhole) forward(dst, src net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !bh.cut.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // the test's cleanup closed it; never half-close on our own
		}
	}
}

// livePair is an agent and a PS session over TCP through addr (the PS
// listens on psLn), each with its own watchdog counter.
type livePair struct {
	agent        *AgentSession
	ps           *PSSession
	agentDeaths  atomic.Int32
	psDeaths     atomic.Int32
	agentSilence atomic.Int64
	psSilence    atomic.Int64
}

func startLivePair(t *testing.T, psLn net.Listener, addr string, deadAfter time.Duration) *livePair {
	t.Helper()
	lp := &livePair{}
	psSess := make(chan *PSSession, 1)
	psErr := make(chan error, 1)
	go func() {
		pc, err := psLn.Accept()
		if err != nil {
			psErr <- err
			return
		}
		_ = pc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := ReadHello(pc); err != nil {
			psErr <- err
			return
		}
		w := &Welcome{PSID: "ps1", Endpoints: []EndpointResult{{Port: 20001}, {Port: 20002}}}
		if err := WriteWelcome(pc, w); err != nil {
			psErr <- err
			return
		}
		_ = pc.SetDeadline(time.Time{})
		s, err := NewPSSession(pc, nil, 0, WithLiveness(Liveness{DeadAfter: deadAfter, OnDead: func(d time.Duration) {
			lp.psSilence.Store(int64(d))
			lp.psDeaths.Add(1)
		}}))
		psErr <- err
		psSess <- s
	}()
	ac, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	as, err := Handshake(context.Background(), ac, testHello(), ClientConfig{Timeout: 5 * time.Second,
		Liveness: Liveness{DeadAfter: deadAfter, OnDead: func(d time.Duration) {
			lp.agentSilence.Store(int64(d))
			lp.agentDeaths.Add(1)
		}}})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if err := <-psErr; err != nil {
		t.Fatalf("ps side: %v", err)
	}
	lp.agent, lp.ps = as, <-psSess
	t.Cleanup(func() { lp.agent.Close(); lp.ps.Close() })
	return lp
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// A peer that vanishes without a RST (every packet dropped, nothing
// closed) is noticed by both ends within about DeadAfter, instead of the
// ~7 s yamux's keepalive took.
func TestSilentPeerDeathIsNoticedOnBothSides(t *testing.T) {
	psLn := listen(t)
	bh := newBlackhole(t, psLn.Addr().String())
	lp := startLivePair(t, psLn, bh.addr, DefaultDeadAfter)
	go echoUpperAsAgent(lp.agent)

	// The tunnel works, and stays up across several DeadAfter while idle:
	// the watchdog's pings keep a quiet but live peer alive.
	st, err := lp.ps.Open(StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100")}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = st.Write([]byte("ping"))
	_ = st.CloseWrite()
	if b, err := io.ReadAll(st); err != nil || string(b) != "PING" {
		t.Fatalf("stream before the cut: %q, %v", b, err)
	}
	select {
	case <-lp.agent.Done():
		t.Fatal("agent session ended while the tunnel was idle but alive")
	case <-lp.ps.Done():
		t.Fatal("ps session ended while the tunnel was idle but alive")
	case <-time.After(3 * DefaultDeadAfter):
	}

	cut := time.Now()
	bh.cut.Store(true)
	agentCh, psCh := timeToDone(lp.agent.Done(), cut), timeToDone(lp.ps.Done(), cut)
	var agentTook, psTook time.Duration
	for _, w := range []struct {
		name string
		ch   <-chan time.Duration
		took *time.Duration
	}{{"agent", agentCh, &agentTook}, {"ps", psCh, &psTook}} {
		select {
		case *w.took = <-w.ch:
		case <-time.After(10*time.Second - time.Since(cut)):
			t.Fatalf("%s session still up 10 s after the peer went silent", w.name)
		}
	}
	t.Logf("silent death noticed: agent after %v, ps after %v (dead after %v)", agentTook.Round(time.Millisecond), psTook.Round(time.Millisecond), DefaultDeadAfter)
	if lp.agentDeaths.Load() != 1 || lp.psDeaths.Load() != 1 {
		t.Fatalf("watchdog closes: agent %d, ps %d; want 1 each (the watchdog, not something else, ended them)", lp.agentDeaths.Load(), lp.psDeaths.Load())
	}
	// Wide margins: DeadAfter plus a quarter tick, on a loaded 2-core host.
	for name, took := range map[string]time.Duration{"agent": agentTook, "ps": psTook} {
		if took > 3*time.Second {
			t.Errorf("%s noticed the silent peer after %v, want < 3 s", name, took)
		}
		if took < DefaultDeadAfter/2 {
			t.Errorf("%s closed after %v, before the peer could have been silent for DeadAfter %v", name, took, DefaultDeadAfter)
		}
	}
}

// Streams that move bulk data in one direction, on a host whose CPUs are
// saturated by other work, never make either end declare the other dead:
// the receiver reads data all the time, and the sender reads the window
// updates and the answers to its pings.
func TestBusyTunnelIsNeverDeclaredDead(t *testing.T) {
	run := 20 * time.Second
	if testing.Short() {
		run = 3 * time.Second
	}
	if s := os.Getenv("TETHER_LIVENESS_RUN"); s != "" {
		if d, err := time.ParseDuration(s); err == nil {
			run = d
		}
	}
	psLn := listen(t)
	lp := startLivePair(t, psLn, psLn.Addr().String(), DefaultDeadAfter)
	go discardAsAgent(lp.agent)

	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	// CPU hogs: twice as many as CPUs, so the tunnel's goroutines compete
	// for every time slice.
	var hogs sync.WaitGroup
	for range 2 * runtime.NumCPU() {
		hogs.Add(1)
		go func() {
			defer hogs.Done()
			var sum [32]byte
			for ctx.Err() == nil {
				for range 1000 {
					sum = sha256.Sum256(sum[:])
				}
			}
		}()
	}
	const streams = 8
	var sent atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := lp.ps.Open(StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100")}, 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			buf := make([]byte, 256<<10)
			for ctx.Err() == nil {
				n, err := st.Write(buf)
				sent.Add(int64(n))
				if err != nil {
					if ctx.Err() == nil {
						errs <- err
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	hogs.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("bulk stream failed: %v", err)
	}
	t.Logf("%d bulk streams for %v under %d CPU hogs: %d MiB sent, watchdog closes: agent %d, ps %d",
		streams, run, 2*runtime.NumCPU(), sent.Load()>>20, lp.agentDeaths.Load(), lp.psDeaths.Load())
	if n := lp.agentDeaths.Load() + lp.psDeaths.Load(); n != 0 {
		t.Fatalf("%d false deaths under load (agent silent %v, ps silent %v)", n,
			time.Duration(lp.agentSilence.Load()), time.Duration(lp.psSilence.Load()))
	}
	select {
	case <-lp.agent.Done():
		t.Fatal("agent session ended under load")
	case <-lp.ps.Done():
		t.Fatal("ps session ended under load")
	default:
	}
	if sent.Load() < 1<<20 {
		t.Fatalf("only %d bytes sent: the load did not run", sent.Load())
	}
}

// discardAsAgent accepts every stream and reads it to the end.
func discardAsAgent(as *AgentSession) {
	for {
		in, err := as.Accept(context.Background())
		if err != nil {
			return
		}
		if _, err := in.ReadHeader(time.Second); err != nil {
			in.Abort()
			continue
		}
		st, err := in.Accept()
		if err != nil {
			continue
		}
		go func() {
			_, _ = io.Copy(io.Discard, st)
			_ = st.Close()
		}()
	}
}

// timeToDone sends how long after since done was closed.
func timeToDone(done <-chan struct{}, since time.Time) <-chan time.Duration {
	ch := make(chan time.Duration, 1)
	go func() {
		<-done
		ch <- time.Since(since)
	}()
	return ch
}

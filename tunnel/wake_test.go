package tunnel

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/relay"
)

// When a tunnel carrying many client connections dies (its agent killed:
// the PS reads EOF), every reader blocked on one of its streams returns at
// once, and the process keeps running its other goroutines meanwhile.
// This guards the outcome; it does not reproduce yamux v0.1.2's spin (see
// streamSet), which needs a stream the session no longer tracks: it passes
// without the wake-up too. The starvation was seen in the e2e suite.
func TestADyingTunnelReleasesItsBlockedStreamsAtOnce(t *testing.T) {
	const streams = 1000
	ln := listen(t)
	lp := startLivePair(t, ln, ln.Addr().String(), time.Second)

	// The agent answers every stream and then holds it, sending nothing:
	// the PS's readers block, as for idle client connections.
	var held sync.Mutex
	var keep []relay.HalfCloser
	go func() {
		for {
			in, err := lp.agent.Accept(context.Background())
			if err != nil {
				return
			}
			if _, err := in.ReadHeader(5 * time.Second); err != nil {
				in.Abort()
				continue
			}
			c, err := in.Accept()
			if err == nil {
				held.Lock()
				keep = append(keep, c)
				held.Unlock()
			}
		}
	}()
	target := netip.MustParseAddrPort("127.77.0.1:80")
	var returned sync.WaitGroup
	var open atomic.Int64
	for range streams {
		st, err := lp.ps.Open(StreamHeader{Target: target}, 5*time.Second)
		if err != nil {
			t.Fatalf("open: %v", err)
		}
		returned.Add(1)
		go func() {
			defer returned.Done()
			buf := make([]byte, 1)
			// The first read returns the agent's status; the next blocks.
			for {
				open.Add(0)
				if _, err := st.Read(buf); err != nil {
					return
				}
			}
		}()
	}
	// Let every reader reach its blocking read.
	time.Sleep(500 * time.Millisecond)

	// A heartbeat that should keep ticking: the longest gap between ticks
	// says how starved the process was.
	var maxGap atomic.Int64
	stop := make(chan struct{})
	go func() {
		last := time.Now()
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case now := <-t.C:
				if gap := now.Sub(last); int64(gap) > maxGap.Load() {
					maxGap.Store(int64(gap))
				}
				last = now
			}
		}
	}()

	killed := time.Now()
	_ = lp.agent.conn.Close() // the agent's socket closes as its process dies
	done := make(chan struct{})
	go func() { returned.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("readers still blocked 20 s after the tunnel died")
	}
	took := time.Since(killed)
	close(stop)
	t.Logf("FIGURE dying_tunnel_%d_readers_returned_in=%v heartbeat_max_gap=%v", streams, took.Round(time.Millisecond), time.Duration(maxGap.Load()).Round(time.Millisecond))
	// Wide margins: the fixed path takes milliseconds; the spin took
	// seconds.
	if took > 2*time.Second {
		t.Errorf("the %d readers of a dead tunnel took %v to return", streams, took)
	}
	if gap := time.Duration(maxGap.Load()); gap > time.Second {
		t.Errorf("the process was starved for %v while the tunnel died", gap)
	}
}

package relay

import (
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"
)

// startJoinWith is startJoin with options.
func startJoinWith(t *testing.T, o Options) *relayed {
	t.Helper()
	x, a := tcpPair(t)
	b, y := tcpPair(t)
	for _, c := range []net.Conn{x, y} {
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
	}
	r := &relayed{x: x, y: y, done: make(chan joinResult, 1)}
	go func() {
		var res joinResult
		res.ab, res.ba, res.err = JoinWith(a, b, o)
		r.done <- res
	}()
	return r
}

// echoOnce sends msg from one peer and reads it at the other.
func echoOnce(t *testing.T, from, to net.Conn, msg string) {
	t.Helper()
	if _, err := from.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(to, got); err != nil || string(got) != msg {
		t.Fatalf("read %q, %v; want %q", got, err, msg)
	}
}

// A join quiet both ways for the idle timeout is closed (both peers see
// the end) and reports ErrIdle; traffic in either direction keeps it open.
func TestIdleTimeoutClosesOnlyQuietJoins(t *testing.T) {
	const timeout = 200 * time.Millisecond
	r := startJoinWith(t, Options{IdleTimeout: timeout})
	// Traffic one way, then the other, for several timeouts.
	for i := range 12 {
		if i > 0 {
			time.Sleep(timeout / 4)
		}
		if i%2 == 0 {
			echoOnce(t, r.x, r.y, "ping")
		} else {
			echoOnce(t, r.y, r.x, "pong")
		}
	}
	quietSince := time.Now()
	res := r.wait(t)
	quiet := time.Since(quietSince)
	if !errors.Is(res.err, ErrIdle) {
		t.Fatalf("Join returned %v, want ErrIdle", res.err)
	}
	if quiet < timeout-50*time.Millisecond {
		t.Fatalf("closed after %v of quiet, before the %v timeout", quiet, timeout)
	}
	for name, c := range map[string]net.Conn{"x": r.x, "y": r.y} {
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("%s read %d bytes, %v after the idle close; want the end of the connection", name, n, err)
		}
	}
	if res.ab != 6*4 || res.ba != 6*4 {
		t.Fatalf("Join reports %d and %d bytes, want 24 each way", res.ab, res.ba)
	}
}

// Idle joins hold no large buffer: 200 joins of TCP connections (with
// counters, so not spliced) that carried a burst each way and went quiet
// cost a few KiB each, not 2 x 256 KiB.
func TestIdleJoinsHoldNoLargeBuffers(t *testing.T) {
	const joins = 200
	burst := make([]byte, 300<<10)
	heapNow := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse
	}
	before := heapNow()
	for range joins {
		r := startJoinWith(t, Options{AToB: &counter{}, BToA: &counter{}})
		go func() { _, _ = r.x.Write(burst) }()
		if _, err := io.ReadFull(r.y, make([]byte, len(burst))); err != nil {
			t.Fatal(err)
		}
		echoOnce(t, r.y, r.x, "done")
	}
	perJoin := (float64(heapNow()) - float64(before)) / joins / 1024
	t.Logf("%.1f KiB of heap per idle join (4 TCP sockets, 2 copy loops)", perJoin)
	if perJoin > 64 {
		t.Fatalf("%.1f KiB of heap per idle join, want a few KiB (under 64)", perJoin)
	}
}

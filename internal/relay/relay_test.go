package relay

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ioTimeout bounds every read and write of a test: generous, since the
// machine may be busy; nothing here measures time.
const ioTimeout = 20 * time.Second

// tcpPair returns both ends of one TCP connection over 127.0.0.1.
func tcpPair(t *testing.T) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			c = nil
		}
		acc <- c
	}()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-acc
	if a == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { d.Close(); a.Close() })
	return d.(*net.TCPConn), a.(*net.TCPConn)
}

// relayed is x <-TCP-> a =Join= b <-TCP-> y: the test drives x and y,
// the two peers of a relay, as a client and a server would.
type relayed struct {
	x, y *net.TCPConn
	done chan joinResult
}

type joinResult struct {
	ab, ba int64
	err    error
}

// counter is a Counter that can be read while Join runs.
type counter struct{ n atomic.Int64 }

func (c *counter) Add(f float64) { c.n.Add(int64(f)) }

func startJoin(t *testing.T, aToB, bToA Counter) *relayed {
	t.Helper()
	x, a := tcpPair(t)
	b, y := tcpPair(t)
	for _, c := range []net.Conn{x, y} {
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
	}
	r := &relayed{x: x, y: y, done: make(chan joinResult, 1)}
	go func() {
		var res joinResult
		res.ab, res.ba, res.err = Join(HalfClose(a), HalfClose(b), aToB, bToA)
		r.done <- res
	}()
	return r
}

func (r *relayed) wait(t *testing.T) joinResult {
	t.Helper()
	select {
	case res := <-r.done:
		return res
	case <-time.After(ioTimeout):
		t.Fatal("Join did not return after both directions ended")
		return joinResult{}
	}
}

// withCounters runs f with and without counters: the two copy paths
// (counted, and io.CopyBuffer that may splice) must behave the same.
func withCounters(t *testing.T, f func(t *testing.T, ab, ba *counter)) {
	t.Run("counted", func(t *testing.T) { f(t, &counter{}, &counter{}) })
	t.Run("uncounted", func(t *testing.T) { f(t, nil, nil) })
}

func counters(ab, ba *counter) (Counter, Counter) {
	if ab == nil {
		return nil, nil
	}
	return ab, ba
}

// A request/response protocol that ends each message with FIN works
// through the relay in both orders: whichever side half-closes first, its
// peer sees EOF, and the other direction keeps flowing until it ends too.
func TestHalfCloseCarriesEOFEachWayWhileTheOtherDirectionFlows(t *testing.T) {
	for _, first := range []string{"x closes first", "y closes first"} {
		t.Run(first, func(t *testing.T) {
			withCounters(t, func(t *testing.T, ab, ba *counter) {
				aToB, bToA := counters(ab, ba)
				r := startJoin(t, aToB, bToA)
				talker, listener := r.x, r.y
				if first == "y closes first" {
					talker, listener = r.y, r.x
				}
				question, answer := []byte("how many bytes?"), []byte("fifteen, then this answer")
				if _, err := talker.Write(question); err != nil {
					t.Fatal(err)
				}
				if err := talker.CloseWrite(); err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(listener) // ends only at the relayed EOF
				if err != nil || !bytes.Equal(got, question) {
					t.Fatalf("the listener read %q, %v; want %q then EOF", got, err, question)
				}
				// The half-closed side still receives.
				if _, err := listener.Write(answer); err != nil {
					t.Fatalf("the listener cannot answer after the talker's half-close: %v", err)
				}
				if err := listener.CloseWrite(); err != nil {
					t.Fatal(err)
				}
				got, err = io.ReadAll(talker)
				if err != nil || !bytes.Equal(got, answer) {
					t.Fatalf("the talker read %q, %v; want %q then EOF", got, err, answer)
				}
				res := r.wait(t)
				if res.err != nil {
					t.Fatalf("Join after two clean half-closes: %v", res.err)
				}
				wantAB, wantBA := int64(len(question)), int64(len(answer))
				if first == "y closes first" {
					wantAB, wantBA = wantBA, wantAB
				}
				if res.ab != wantAB || res.ba != wantBA {
					t.Fatalf("Join reports %d bytes a->b and %d b->a, want %d and %d", res.ab, res.ba, wantAB, wantBA)
				}
				if ab != nil && (ab.n.Load() != wantAB || ba.n.Load() != wantBA) {
					t.Fatalf("counters say %d a->b and %d b->a, want %d and %d", ab.n.Load(), ba.n.Load(), wantAB, wantBA)
				}
			})
		})
	}
}

// Counters move while a transfer runs, not only when it ends: a long
// download shows up in the metrics as it goes.
func TestCountersCountWhileTheConnectionIsOpen(t *testing.T) {
	ab, ba := &counter{}, &counter{}
	r := startJoin(t, ab, ba)
	up, down := make([]byte, 3000), make([]byte, 70000)
	if _, err := r.x.Write(up); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(r.y, make([]byte, len(up))); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = r.y.Write(down) }()
	if _, err := io.ReadFull(r.x, make([]byte, len(down))); err != nil {
		t.Fatal(err)
	}
	// Everything was delivered and nothing is closed yet: the counters must
	// reach the totals now (they are bumped right after each write, so
	// allow the relay a moment to get there).
	waitCount(t, "a->b", ab, int64(len(up)))
	waitCount(t, "b->a", ba, int64(len(down)))
	_ = r.x.CloseWrite()
	_ = r.y.CloseWrite()
	if res := r.wait(t); res.err != nil || res.ab != int64(len(up)) || res.ba != int64(len(down)) {
		t.Fatalf("Join: %d, %d, %v; want %d, %d, nil", res.ab, res.ba, res.err, len(up), len(down))
	}
}

func waitCount(t *testing.T, what string, c *counter, want int64) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for c.n.Load() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s counter %d while the connection is open, want %d", what, c.n.Load(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// When one direction fails (y's end is reset), Join aborts: the other
// peer sees a reset rather than a clean EOF, so it cannot take a cut
// transfer for a complete one, and Join reports the failure.
func TestAFailedDirectionResetsThePeer(t *testing.T) {
	withCounters(t, func(t *testing.T, ab, ba *counter) {
		aToB, bToA := counters(ab, ba)
		r := startJoin(t, aToB, bToA)
		if _, err := r.x.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r.y, make([]byte, 5)); err != nil {
			t.Fatal(err)
		}
		_ = r.y.SetLinger(0)
		_ = r.y.Close() // RST: b's next read fails
		res := r.wait(t)
		if res.err == nil {
			t.Fatal("Join returned no error after y's reset")
		}
		n, err := r.x.Read(make([]byte, 16))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("x read %d bytes, %v after y's reset; want a reset (ECONNRESET), not EOF", n, err)
		}
	})
}

// Two TCP connections without counters (the splice path) carry several
// MB each way, concurrently, without losing or reordering a byte.
func TestJoinCarriesMegabytesBothWaysIntact(t *testing.T) {
	r := startJoin(t, nil, nil)
	const upN, downN = 6 << 20, 4 << 20
	var wg sync.WaitGroup
	var upSum, downSum [32]byte
	var upGot, downGot [32]byte
	var upErr, downErr error
	var upRead, downRead int64
	send := func(c *net.TCPConn, n int, sum *[32]byte) {
		defer wg.Done()
		buf := make([]byte, n)
		_, _ = rand.Read(buf)
		*sum = sha256.Sum256(buf)
		if _, err := c.Write(buf); err != nil {
			t.Errorf("write: %v", err)
		}
		_ = c.CloseWrite()
	}
	recv := func(c *net.TCPConn, sum *[32]byte, n *int64, errp *error) {
		defer wg.Done()
		h := sha256.New()
		*n, *errp = io.Copy(h, c)
		copy(sum[:], h.Sum(nil))
	}
	wg.Add(4)
	go send(r.x, upN, &upSum)
	go send(r.y, downN, &downSum)
	go recv(r.y, &upGot, &upRead, &upErr)
	go recv(r.x, &downGot, &downRead, &downErr)
	wg.Wait()
	if upErr != nil || upRead != upN || upGot != upSum {
		t.Errorf("x->y: read %d of %d bytes, %v; checksum match %v", upRead, upN, upErr, upGot == upSum)
	}
	if downErr != nil || downRead != downN || downGot != downSum {
		t.Errorf("y->x: read %d of %d bytes, %v; checksum match %v", downRead, downN, downErr, downGot == downSum)
	}
	if res := r.wait(t); res.err != nil || res.ab != upN || res.ba != downN {
		t.Fatalf("Join: %d, %d, %v; want %d, %d, nil", res.ab, res.ba, res.err, upN, downN)
	}
}

// A connection without CloseWrite gets a full close where a half-close
// was asked for; a TCP connection keeps its own CloseWrite.
func TestHalfCloseFallsBackToClose(t *testing.T) {
	p, q := net.Pipe()
	defer q.Close()
	if err := HalfClose(p).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("write after the fallback close: %v, want io.ErrClosedPipe", err)
	}
	x, _ := tcpPair(t)
	if _, ok := HalfClose(x).(*net.TCPConn); !ok {
		t.Fatalf("HalfClose wrapped a *net.TCPConn: %T", HalfClose(x))
	}
}

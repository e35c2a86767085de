// Package relay owns moving bytes both ways between two connections: the
// copy loops, half-close when one direction ends, the reset that tells
// both peers when a direction fails, the buffers the copies use, and the
// idle timeout. The PS, the agent and the proxy all carry connections
// through Join, so the rules live here once.
//
// Buffers are held only while data flows: an idle connection must cost
// kilobytes, not the 256 KiB per direction a bulk transfer wants, because
// a PS may carry tens of thousands of connections that mostly sit idle.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// HalfCloser is a connection whose write side can be closed alone, so that
// the peer sees EOF while the other direction keeps flowing.
type HalfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Counter counts bytes as they are copied; a prometheus.Counter is one.
type Counter interface{ Add(float64) }

// ErrIdle is returned by JoinWith when it closed both ends because no byte
// moved either way for Options.IdleTimeout.
var ErrIdle = errors.New("no traffic either way within the idle timeout")

// Options tunes JoinWith.
type Options struct {
	// AToB and BToA, when not nil, count the bytes copied each way as
	// they go.
	AToB, BToA Counter
	// IdleTimeout, when positive, closes both ends once no byte has moved
	// either way for this long; JoinWith then returns ErrIdle. Zero means
	// never.
	IdleTimeout time.Duration
}

// HalfClose returns c as a HalfCloser. A connection without CloseWrite
// gets a full close where a half-close was asked for.
func HalfClose(c net.Conn) HalfCloser {
	if hc, ok := c.(HalfCloser); ok {
		return hc
	}
	return noHalfClose{c}
}

type noHalfClose struct{ net.Conn }

func (n noHalfClose) CloseWrite() error { return n.Conn.Close() }

// Join copies a to b and b to a until both directions end, counting the
// bytes of each way in aToB and bToA when they are not nil. It is
// JoinWith without an idle timeout.
func Join(a, b HalfCloser, aToB, bToA Counter) (sentAB, sentBA int64, err error) {
	return JoinWith(a, b, Options{AToB: aToB, BToA: bToA})
}

// JoinWith copies a to b and b to a until both directions end. When one
// direction reaches EOF it half-closes the destination (CloseWrite), so
// protocols that rely on FIN work; when a direction fails, it closes both
// ends with a reset so the other direction ends too and each peer sees an
// abort rather than a clean end. With an idle timeout, a connection quiet
// both ways that long is closed (without a reset: nothing was cut) and
// ErrIdle returned. Both ends are closed on return. Two TCP connections
// without counters or idle timeout are joined with splice in the kernel.
func JoinWith(a, b HalfCloser, o Options) (sentAB, sentBA int64, err error) {
	var idle *idleTimer
	if o.IdleTimeout > 0 {
		idle = newIdleTimer(o.IdleTimeout, func() {
			_ = a.Close()
			_ = b.Close()
		})
		defer idle.stop()
	}
	return join(a, b, o, idle, pipe)
}

// join runs move both ways (a to b in a goroutine, b to a here) with the
// rules JoinWith and Splice share: a failed direction resets and closes
// both ends unless the idle timer closed them on purpose, both ends are
// closed on return, and an idle close is reported as ErrIdle.
func join[C HalfCloser](a, b C, o Options, idle *idleTimer, move func(dst, src C, count Counter, idle *idleTimer) (int64, error)) (sentAB, sentBA int64, err error) {
	abort := func() {
		if idle.fired() {
			return // the ends are closed already, on purpose
		}
		Reset(a)
		Reset(b)
		_ = a.Close()
		_ = b.Close()
	}
	var wg sync.WaitGroup
	var errAB error
	wg.Add(1)
	go func() {
		defer wg.Done()
		sentAB, errAB = move(b, a, o.AToB, idle)
		if errAB != nil {
			abort()
		}
	}()
	var errBA error
	sentBA, errBA = move(a, b, o.BToA, idle)
	if errBA != nil {
		abort()
	}
	wg.Wait()
	_ = a.Close()
	_ = b.Close()
	if idle.fired() {
		return sentAB, sentBA, ErrIdle
	}
	return sentAB, sentBA, errors.Join(errAB, errBA)
}

// pipe copies src to dst, then half-closes dst.
func pipe(dst, src HalfCloser, count Counter, idle *idleTimer) (int64, error) {
	var total int64
	var err error
	if count == nil && idle == nil && isTCP(dst) && isTCP(src) {
		// *net.TCPConn.ReadFrom splices in the kernel: no user-space
		// buffer at all.
		total, err = io.Copy(dst, src)
	} else {
		total, err = copyLoop(dst, src, count, idle)
	}
	if err == nil {
		return total, dst.CloseWrite()
	}
	if errors.Is(err, net.ErrClosed) || idle.fired() {
		// The other direction failed, or the idle timer fired, and
		// closed both ends.
		return total, nil
	}
	return total, err
}

func isTCP(c HalfCloser) bool {
	_, ok := c.(*net.TCPConn)
	return ok
}

// copyLoop copies src to dst until EOF (then it returns nil), counting each
// write as it happens so long transfers show up in metrics while they run,
// and holding a large buffer only while data flows (see buffers).
func copyLoop(dst io.Writer, src io.Reader, count Counter, idle *idleTimer) (int64, error) {
	var bufs buffers
	defer bufs.close()
	rawRead := newRawReader(src)
	var total int64
	for {
		var data, buf []byte
		var rerr error
		if rawRead != nil {
			data, rerr = rawRead(&bufs)
		} else {
			buf = bufs.current()
			var n int
			n, rerr = src.Read(buf)
			data = buf[:n]
		}
		if len(data) > 0 {
			idle.touch()
			w, werr := dst.Write(data)
			total += int64(w)
			if w > 0 && count != nil {
				count.Add(float64(w))
			}
			if werr != nil {
				return total, werr
			}
			idle.touch()
		}
		if rawRead == nil {
			// Only now that data was written may its buffer go back.
			bufs.adapt(src, len(data), len(buf))
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return total, nil
			}
			return total, rerr
		}
	}
}

// Reset makes the next Close of c send a RST (SO_LINGER 0) when c is a
// TCP connection, so the peer sees a refusal or an abort at once.
func Reset(c any) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
}

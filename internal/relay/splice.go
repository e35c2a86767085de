package relay

import (
	"errors"
	"io"
	"net"
	"time"
)

// spliceChunk is how much one kernel splice call moves before Splice
// counts it and touches the idle timer. A chunk is one splice(2) call of
// the runtime (it moves at most 1 MiB per call anyway), so counting per
// chunk costs nothing measurable, and a metric scraped every few seconds
// sees a bulk transfer move (at 1 GB/s, a thousand updates a second).
const spliceChunk = 1 << 20

// TCPConner is a connection wrapper that can hand over the plain TCP
// connection it wraps, so that Splice can move bytes in the kernel. Only a
// wrapper that holds no unread bytes of its own and adds nothing on the
// wire (no TLS) may implement it: Splice reads and writes the TCP
// connection directly.
type TCPConner interface {
	TCPConn() *net.TCPConn
}

// Splice joins a and b as JoinWith does (half-close each way, counters,
// idle timeout, a reset of both when a direction fails, both closed on
// return), but when both ends are plain TCP (a *net.TCPConn, or a
// TCPConner) it moves the bytes with splice(2) in the kernel, in chunks of
// spliceChunk so that the counters move while a transfer runs. The idle
// timer additionally asks the kernel (TCP_INFO) whether bytes arrived on
// either socket before it fires, so a slow connection that has not yet
// filled a chunk is not taken for idle. Any other pair (TLS) is joined by
// JoinWith's user-space loop.
func Splice(a, b net.Conn, o Options) (sentAB, sentBA int64, err error) {
	ta, okA := plainTCP(a)
	tb, okB := plainTCP(b)
	if !okA || !okB {
		return JoinWith(HalfClose(a), HalfClose(b), o)
	}
	var idle *idleTimer
	if o.IdleTimeout > 0 {
		idle = &idleTimer{timeout: o.IdleTimeout, base: time.Now(), moved: kernelProgress(ta, tb), onIdle: func() {
			_ = ta.Close()
			_ = tb.Close()
		}}
		idle.t = time.AfterFunc(o.IdleTimeout, idle.check)
		defer idle.stop()
	}
	return join(ta, tb, o, idle, splicePipe)
}

// plainTCP returns the TCP connection under c when c is plain TCP.
func plainTCP(c net.Conn) (*net.TCPConn, bool) {
	switch t := c.(type) {
	case *net.TCPConn:
		return t, true
	case TCPConner:
		tc := t.TCPConn()
		return tc, tc != nil
	}
	return nil, false
}

// splicePipe copies src to dst chunk by chunk (each io.CopyN between two
// *net.TCPConn is a kernel splice), then half-closes dst.
func splicePipe(dst, src *net.TCPConn, count Counter, idle *idleTimer) (int64, error) {
	var total int64
	for {
		n, err := io.CopyN(dst, src, spliceChunk)
		total += n
		if n > 0 {
			idle.touch()
			if count != nil {
				count.Add(float64(n))
			}
		}
		switch {
		case err == nil:
			continue // a full chunk: more may follow
		case errors.Is(err, io.EOF):
			return total, dst.CloseWrite()
		case errors.Is(err, net.ErrClosed) || idle.fired():
			// The other direction failed, or the idle timer fired, and
			// closed both ends.
			return total, nil
		default:
			return total, err
		}
	}
}

// Package relay owns moving bytes both ways between two connections: the
// copy loops, half-close when one direction ends, and the reset that
// tells both peers when a direction fails. The PS, the agent and the
// proxy all carry connections through Join, so the rule lives here once.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
)

// copyBufSize is the size of the pooled copy buffers: large enough that a
// yamux data frame carries a useful amount and bulk transfers take few
// syscalls (test/bench/tunnel measured 64 KiB and 256 KiB), small enough to
// pool cheaply.
const copyBufSize = 256 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// HalfCloser is a connection whose write side can be closed alone, so that
// the peer sees EOF while the other direction keeps flowing.
type HalfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Counter counts bytes as they are copied; a prometheus.Counter is one.
type Counter interface{ Add(float64) }

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

// Join copies a to b and b to a until both directions end. When one
// direction reaches EOF it half-closes the destination (CloseWrite), so
// protocols that rely on FIN work; when a direction fails, it closes both
// ends with a reset so the other direction ends too and each peer sees an
// abort rather than a clean end. Both ends are closed on return. aToB and
// bToA, when not nil, count the bytes copied each way as they go; without
// counters, two TCP connections are joined with splice in the kernel.
func Join(a, b HalfCloser, aToB, bToA Counter) (sentAB, sentBA int64, err error) {
	abort := func() {
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
		sentAB, errAB = pipe(b, a, aToB)
		if errAB != nil {
			abort()
		}
	}()
	var errBA error
	sentBA, errBA = pipe(a, b, bToA)
	if errBA != nil {
		abort()
	}
	wg.Wait()
	_ = a.Close()
	_ = b.Close()
	return sentAB, sentBA, errors.Join(errAB, errBA)
}

// pipe copies src to dst with a pooled buffer, then half-closes dst.
func pipe(dst, src HalfCloser, count Counter) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	var total int64
	var err error
	if count == nil {
		// io.CopyBuffer lets *net.TCPConn pairs use splice.
		total, err = io.CopyBuffer(dst, src, *bp)
	} else {
		total, err = countedCopy(dst, src, *bp, count)
	}
	if err == nil {
		return total, dst.CloseWrite()
	}
	if errors.Is(err, net.ErrClosed) {
		// The other direction failed and closed both ends.
		return total, nil
	}
	return total, err
}

// countedCopy is io.CopyBuffer that counts each write as it happens, so
// long transfers show up in metrics while they run. It returns nil at EOF.
func countedCopy(dst io.Writer, src io.Reader, buf []byte, count Counter) (int64, error) {
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if w > 0 {
				count.Add(float64(w))
			}
			if werr != nil {
				return total, werr
			}
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

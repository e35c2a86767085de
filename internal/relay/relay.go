package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
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

// Join copies a to b and b to a until both directions end. When one
// direction reaches EOF it half-closes the destination (CloseWrite), so
// protocols that rely on FIN work; when a direction fails, it closes both
// ends so the other direction ends too. Both ends are closed on return.
// aToB and bToA, when not nil, count the bytes copied each way as they go.
func Join(a, b HalfCloser, aToB, bToA prometheus.Counter) (sentAB, sentBA int64, err error) {
	// A failed direction becomes a reset on the TCP side(s), so the client
	// or target sees an abort rather than a clean end; closing both ends
	// also stops the other direction.
	abort := func() {
		resetOnClose(a)
		resetOnClose(b)
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
func pipe(dst, src HalfCloser, count prometheus.Counter) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if count != nil && w > 0 {
				count.Add(float64(w))
			}
			if werr != nil {
				return total, werr
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return total, dst.CloseWrite()
			}
			if isClosed(rerr) {
				// The other direction failed and closed both ends.
				return total, nil
			}
			return total, rerr
		}
	}
}

func resetOnClose(c any) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
}

func isClosed(err error) bool {
	return errors.Is(err, net.ErrClosed)
}

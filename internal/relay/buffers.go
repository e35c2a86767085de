package relay

import (
	"io"
	"sync"
	"time"
)

// The copy buffers. largeSize is what a bulk transfer wants: a yamux data
// frame carries a useful amount and a transfer takes few syscalls
// (test/bench/tunnel measured 64 KiB and 256 KiB). smallSize is what a
// direction holds while it waits on a source that cannot be waited on
// without a buffer (a yamux stream); it is enough for a request or an
// answer of an interactive protocol in one read.
const (
	largeSize = 256 << 10
	smallSize = 4 << 10
)

var largePool = sync.Pool{New: func() any { b := make([]byte, largeSize); return &b }}

// shrinkAfter is how long a source that keeps a receive buffer of its own
// (a yamux stream keeps the largest it ever needed) must stay quiet before
// it is told to drop it. Dropping it while data flows would make the
// source allocate a buffer per frame; waiting this long means only quiet
// connections pay, once.
const shrinkAfter = time.Second

// buffers are the copy buffers of one direction. The large buffer comes
// from a pool and goes back as soon as the data stops; the small one is
// allocated on first use and kept.
type buffers struct {
	small  []byte
	big    *[]byte
	shrink *time.Timer // tells the source to drop its buffer; nil until needed
}

// large returns the large buffer, taking it from the pool if needed.
func (b *buffers) large() []byte {
	if b.big == nil {
		b.big = largePool.Get().(*[]byte)
	}
	return *b.big
}

// current returns the large buffer while one is held, else the small one.
func (b *buffers) current() []byte {
	if b.big != nil {
		return *b.big
	}
	if b.small == nil {
		b.small = make([]byte, smallSize)
	}
	return b.small
}

// release gives the large buffer back to the pool.
func (b *buffers) release() {
	if b.big != nil {
		largePool.Put(b.big)
		b.big = nil
	}
}

// close releases everything when the direction ends.
func (b *buffers) close() {
	b.release()
	if b.shrink != nil {
		b.shrink.Stop()
	}
}

// adapt picks the buffer for the next read from a source that must be
// read to be waited on, after a read of n bytes into a buffer of size: a
// full read means data is flowing, so take the large buffer; a short read
// means the source is (nearly) drained and the next read may block, so give
// the large buffer back, and tell a source with a receive buffer of its own
// to drop it if that read stays blocked for shrinkAfter.
func (b *buffers) adapt(src io.Reader, n, size int) {
	if n >= size {
		b.large()
		if b.shrink != nil {
			b.shrink.Stop()
		}
		return
	}
	b.release()
	if s, ok := src.(interface{ Shrink() }); ok {
		if b.shrink == nil {
			b.shrink = time.AfterFunc(shrinkAfter, s.Shrink)
		} else {
			b.shrink.Reset(shrinkAfter)
		}
	}
}

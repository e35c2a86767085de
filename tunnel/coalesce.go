package tunnel

import (
	"crypto/tls"
	"encoding/binary"
	"net"
	"sync"
)

// yamux frame header layout (see yamux's spec.md): version, type, flags,
// stream id, length; 12 bytes.
const (
	yamuxHeaderSize = 12
	yamuxTypeData   = 0
)

// tlsRecordPayload is the most plaintext one TLS record carries.
const tlsRecordPayload = 16 << 10

// coalescingConn sits under a yamux session. yamux's send loop writes each
// data frame as two writes, the 12-byte header and then the body; on its
// own that doubles the syscalls (or TLS records) of the data path. This
// holds back a data-frame header and sends it together with the body that
// the same goroutine writes right after: with one writev on TCP; under TLS
// in the body's first record, and, when the TLS connection runs over a
// recordBatcher, with all the frame's records in one write. Other frames
// (window updates, pings, go-away) have no body and pass through. Only
// yamux's single send goroutine writes, so no lock is needed.
type coalescingConn struct {
	net.Conn
	tcp     *net.TCPConn   // the raw connection when it is plain TCP
	batch   *recordBatcher // under the TLS connection, when there is one
	hdr     [yamuxHeaderSize]byte
	pending bool
	first   []byte // header + start of the body, one record's worth; TLS only
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c}
	cc.tcp, _ = c.(*net.TCPConn)
	if cc.tcp == nil {
		cc.first = make([]byte, tlsRecordPayload)
	}
	if tc, ok := c.(*tls.Conn); ok {
		cc.batch, _ = tc.NetConn().(*recordBatcher)
	}
	return cc
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	if c.pending {
		c.pending = false
		if c.tcp != nil {
			bufs := net.Buffers{c.hdr[:], p}
			n, err := bufs.WriteTo(c.tcp)
			return max(0, int(n)-yamuxHeaderSize), err
		}
		return c.writeRecords(p)
	}
	if len(p) == yamuxHeaderSize && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:12]) > 0 {
		copy(c.hdr[:], p)
		c.pending = true
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// writeRecords writes the held header and body p through TLS (or any other
// wrapper). The header rides in the first record with as much of the body
// as fits, so that only those 16 KiB are copied, not the whole body (up to
// the relay's 256 KiB); the rest is written as it is. Over a recordBatcher
// all the records leave in one write when the frame is complete.
func (c *coalescingConn) writeRecords(p []byte) (int, error) {
	if c.batch != nil {
		c.batch.hold()
	}
	head := min(len(p), len(c.first)-yamuxHeaderSize)
	copy(c.first[:], c.hdr[:])
	copy(c.first[yamuxHeaderSize:], p[:head])
	n, err := c.Conn.Write(c.first[:yamuxHeaderSize+head])
	n = max(0, n-yamuxHeaderSize)
	if err == nil && head < len(p) {
		var m int
		m, err = c.Conn.Write(p[head:])
		n += m
	}
	if c.batch != nil {
		if ferr := c.batch.flush(); err == nil {
			err = ferr
		}
	}
	return n, err
}

// CloseWrite keeps the half-close of the underlying connection reachable.
func (c *coalescingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// BatchRecords wraps the raw connection of a tunnel before TLS goes on it
// (tls.Client(BatchRecords(raw), cfg)), so that the session can send all
// the TLS records of one yamux frame with one write. crypto/tls writes
// each record of at most 16 KiB with a write of its own: a 256 KiB frame
// costs 17 syscalls, and on the receiving host 17 small segments. Outside
// a frame (the handshake, alerts) writes pass through unchanged.
func BatchRecords(raw net.Conn) net.Conn { return &recordBatcher{Conn: raw} }

// batchPool holds the buffers of frames being batched: a session holds one
// only while it writes a frame, so thousands of quiet tunnels hold none.
var batchPool = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledBatch bounds the buffer kept for the next frame (a frame is at
// most the relay's 256 KiB plus record overhead).
const maxPooledBatch = 1 << 20

// recordBatcher collects writes between hold and flush and sends them in
// one write. The lock orders a record written by crypto/tls outside the
// send loop (an alert, a key update answer) against a batch: one that comes
// while a batch is held joins it, in order.
type recordBatcher struct {
	net.Conn
	mu   sync.Mutex
	held *[]byte // non-nil between hold and flush
}

func (b *recordBatcher) hold() {
	b.mu.Lock()
	b.held = batchPool.Get().(*[]byte)
	*b.held = (*b.held)[:0]
	b.mu.Unlock()
}

func (b *recordBatcher) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.held != nil {
		*b.held = append(*b.held, p...)
		return len(p), nil
	}
	return b.Conn.Write(p)
}

// flush writes what was held and ends the batch.
func (b *recordBatcher) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	held := b.held
	b.held = nil
	if held == nil {
		return nil
	}
	_, err := b.Conn.Write(*held)
	if cap(*held) <= maxPooledBatch {
		batchPool.Put(held)
	}
	return err
}

// NetConn is the raw connection, for the socket options of the session
// (TCP_USER_TIMEOUT, the receive queue) and for half-close.
func (b *recordBatcher) NetConn() net.Conn { return b.Conn }

// CloseWrite half-closes the raw connection.
func (b *recordBatcher) CloseWrite() error {
	if cw, ok := b.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return b.Conn.Close()
}

package tunnel

import (
	"encoding/binary"
	"net"
)

// yamux frame header layout (see yamux's spec.md): version, type, flags,
// stream id, length; 12 bytes.
const (
	yamuxHeaderSize = 12
	yamuxTypeData   = 0
)

// coalescingConn sits under a yamux session. yamux's send loop writes each
// data frame as two writes, the 12-byte header and then the body; on its
// own that doubles the syscalls (or TLS records) of the data path. This
// holds back a data-frame header and sends it together with the body that
// the same goroutine writes right after, with one writev on TCP. Other
// frames (window updates, pings, go-away) have no body and pass through.
// Only yamux's single send goroutine writes, so no lock is needed.
type coalescingConn struct {
	net.Conn
	tcp     *net.TCPConn // the raw connection when it is plain TCP
	hdr     [yamuxHeaderSize]byte
	pending bool
	buf     []byte // header+body for non-TCP connections (TLS)
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c}
	cc.tcp, _ = c.(*net.TCPConn)
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
		c.buf = append(append(c.buf[:0], c.hdr[:]...), p...)
		n, err := c.Conn.Write(c.buf)
		if cap(c.buf) > 1<<20 {
			c.buf = nil // do not pin a large buffer after a burst
		}
		return max(0, n-yamuxHeaderSize), err
	}
	if len(p) == yamuxHeaderSize && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:12]) > 0 {
		copy(c.hdr[:], p)
		c.pending = true
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// CloseWrite keeps the half-close of the underlying connection reachable.
func (c *coalescingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

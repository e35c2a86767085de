//go:build unix

package relay

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
)

// newRawReader returns a function that reads from src into the large buffer
// of bufs, taking that buffer from the pool only when the socket has data
// and giving it back before it waits, so that a quiet socket holds no
// buffer; nil when src is not a socket it can read that way.
//
// It reads through syscall.RawConn.Read, whose callback runs with the fd
// kept open: the callback does the non-blocking read itself and returns
// false on EAGAIN, and the runtime then parks the goroutine until the poller
// sees the socket readable and calls it again. That is what net.Conn.Read
// does inside, with the one difference that matters here: no buffer is
// held while parked. Only *net.TCPConn and *net.UnixConn qualify: a wrapper
// could hold data of its own, or mean something else by Read.
func newRawReader(src io.Reader) func(bufs *buffers) ([]byte, error) {
	var sc syscall.Conn
	switch c := src.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var (
		bufs *buffers
		n    int
		rerr error
	)
	read := func(fd uintptr) bool {
		buf := bufs.large()
		for {
			n, rerr = syscall.Read(int(fd), buf)
			if !errors.Is(rerr, syscall.EINTR) {
				break
			}
		}
		if errors.Is(rerr, syscall.EAGAIN) {
			bufs.release()
			return false
		}
		return true
	}
	return func(b *buffers) ([]byte, error) {
		bufs = b
		if err := rc.Read(read); err != nil {
			return nil, err // closed, or a deadline
		}
		switch {
		case rerr != nil:
			return nil, os.NewSyscallError("read", rerr)
		case n == 0:
			return nil, io.EOF
		}
		return bufs.current()[:n], nil
	}
}

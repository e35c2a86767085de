package relay

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// kernelProgress returns a function that reports whether either socket
// received bytes since it was last asked (TCP_INFO's bytes_received, Linux
// 4.1+): the idle timer of a Splice asks it, because a splice moves a
// whole chunk before the copy loop can see it.
func kernelProgress(a, b *net.TCPConn) func() bool {
	last := bytesReceived(a) + bytesReceived(b)
	return func() bool {
		now := bytesReceived(a) + bytesReceived(b)
		moved := now != last
		last = now
		return moved
	}
}

// bytesReceived is the socket's count of bytes received, 0 when unknown.
func bytesReceived(c *net.TCPConn) uint64 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint64
	_ = rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), syscall.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Bytes_received
		}
	})
	return n
}

package tunnel

import (
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// setUserTimeout sets TCP_USER_TIMEOUT on c when it is a TCP socket:
// transmitted data left unacknowledged for d makes the kernel abort the
// connection, where it would otherwise retransmit for about 15 minutes.
func setUserTimeout(c net.Conn, d time.Duration) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil // a pipe in tests, or anything else without a socket
	}
	if _, isTCP := c.(*net.TCPConn); !isTCP {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("tcp user timeout: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	}); err != nil {
		return fmt.Errorf("tcp user timeout: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("tcp user timeout %v: %w", d, serr)
	}
	return nil
}

// unreadBytes is how many bytes wait in c's receive queue, read by nobody
// yet (SIOCINQ); 0 when c is no TCP socket or the kernel does not say.
func unreadBytes(c net.Conn) int {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return 0
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		if v, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil {
			n = v
		}
	})
	return n
}

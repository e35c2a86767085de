package tunnel

import (
	"context"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func userTimeoutOf(c net.Conn) (time.Duration, error) {
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var ms int
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		ms, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	}); err != nil {
		return 0, err
	}
	return time.Duration(ms) * time.Millisecond, gerr
}

// The TCP_USER_TIMEOUT is set on the socket under TLS too.
func TestUserTimeoutIsSetUnderTLS(t *testing.T) {
	for _, tr := range transports(t) {
		if tr.name == "pipe" {
			continue
		}
		t.Run(tr.name, func(t *testing.T) {
			ac, pc, cliTLS := tr.pair(t)
			psSess, psErr := welcomeAsPS(pc)
			as, err := Handshake(context.Background(), ac, testHello(), ClientConfig{TLS: cliTLS, Timeout: 5 * time.Second})
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			defer as.Close()
			if err := <-psErr; err != nil {
				t.Fatal(err)
			}
			ps := <-psSess
			defer ps.Close()
			for name, c := range map[string]net.Conn{"agent": ac, "ps": rawConn(pc)} {
				got, err := userTimeoutOf(c)
				if err != nil {
					t.Fatal(err)
				}
				if want := userTimeout(DefaultDeadAfter); got != want {
					t.Errorf("%s socket: TCP_USER_TIMEOUT %v, want %v", name, got, want)
				}
			}
		})
	}
}

// The watchdog counts bytes waiting unread in the socket as life: a peer
// whose answer arrived while this process's receive loop had no CPU is not
// dead.
func TestUnreadBytesSeesTheReceiveQueue(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n := unreadBytes(c); n != 0 {
		t.Fatalf("%d unread bytes before anything was sent", n)
	}
	if _, err := s.Write([]byte("ping!")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for unreadBytes(c) != 5 {
		if time.Now().After(deadline) {
			t.Fatalf("unread bytes %d, want 5", unreadBytes(c))
		}
		time.Sleep(time.Millisecond)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if n := unreadBytes(c); n != 0 {
		t.Fatalf("%d unread bytes after reading them", n)
	}
}

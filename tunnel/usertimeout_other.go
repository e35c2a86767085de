//go:build !linux

package tunnel

import (
	"net"
	"time"
)

// setUserTimeout is a no-op where TCP_USER_TIMEOUT does not exist; the
// liveness watchdog still closes a session whose peer went silent.
func setUserTimeout(net.Conn, time.Duration) error { return nil }

// unreadBytes is 0 where the receive queue cannot be asked: the watchdog
// judges by what was read.
func unreadBytes(net.Conn) int { return 0 }

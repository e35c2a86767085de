package tunnel

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// Liveness of a tunnel. A peer that vanishes without a RST (host gone,
// packets dropped on the way) leaves a TCP connection that looks fine: no
// read fails, and writes only fill the socket buffer. yamux's own
// keepalive needs its interval plus ConnectionWriteTimeout to notice (it
// took about 7 s with the 2 s + 5 s we used to run). Instead, each end watches its connection: every
// successful read records the time, and a session that has read nothing
// at all for DeadAfter is closed. Any byte counts as life (data, window
// updates, pings, pong), so a peer busy sending bulk data is never declared
// dead; when the connection is quiet the watchdog pings, and a peer that
// only receives still answers pings and sends window updates.
const (
	// DefaultDeadAfter is how long a tunnel may read nothing before it is
	// declared dead: about a second, the goal of issue 11. Loopback and LAN
	// round trips are far below it, and a healthy idle peer answers the
	// pings sent every DeadAfter/4.
	DefaultDeadAfter = time.Second
	// MinDeadAfter bounds the setting from below: pings every DeadAfter/4
	// must stay well above a scheduler hiccup on a loaded host.
	MinDeadAfter = 200 * time.Millisecond
	// minUserTimeout is the smallest TCP_USER_TIMEOUT set on tunnel
	// sockets (see userTimeout).
	minUserTimeout = 5 * time.Second
)

// ErrPeerSilent is the reason a session is closed by the watchdog.
var ErrPeerSilent = errors.New("tunnel peer silent")

// Liveness configures the watchdog of one session.
type Liveness struct {
	// DeadAfter: nothing read for this long closes the session;
	// 0 = DefaultDeadAfter.
	DeadAfter time.Duration
	// OnDead, when set, is called once when the watchdog closes the
	// session (so the owner can count it), with how long it was silent.
	OnDead func(silent time.Duration)
}

func (l Liveness) deadAfter() time.Duration {
	if l.DeadAfter <= 0 {
		return DefaultDeadAfter
	}
	return max(l.DeadAfter, MinDeadAfter)
}

// userTimeout is the TCP_USER_TIMEOUT of a tunnel socket: data unacked
// this long makes the kernel abort the connection. It backs the watchdog
// up where the watchdog cannot act (a write blocked in the kernel), and is
// kept well above DeadAfter so that a burst of losses that TCP recovers
// from by retransmission (RTO 200 ms, 400 ms, 800 ms, ...) never kills a
// tunnel the watchdog still finds alive.
func userTimeout(deadAfter time.Duration) time.Duration {
	return max(minUserTimeout, 3*deadAfter)
}

// livenessConn records when the connection under a session last read
// anything. It sits above coalescingConn, which must see the raw TCP
// connection for its writev path; Write passes through untouched.
//
// Its first failed read or write wakes the session's streams (see
// streamSet) before yamux sees the error and shuts the session down.
type livenessConn struct {
	net.Conn
	base     time.Time    // monotonic origin of lastRead
	lastRead atomic.Int64 // nanoseconds since base of the last read of > 0 bytes
	streams  *streamSet
}

func newLivenessConn(c net.Conn, streams *streamSet) *livenessConn {
	return &livenessConn{Conn: c, base: time.Now(), streams: streams}
}

func (c *livenessConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.lastRead.Store(int64(time.Since(c.base)))
	}
	if err != nil {
		c.streams.wake()
	}
	return n, err
}

func (c *livenessConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil {
		c.streams.wake()
	}
	return n, err
}

// silentFor is how long the connection has read nothing.
func (c *livenessConn) silentFor() time.Duration {
	return time.Since(c.base) - time.Duration(c.lastRead.Load())
}

// startSession wraps conn (the handshake's connection, TLS or not) for a
// yamux session, sets TCP_USER_TIMEOUT on the socket under it, starts the
// session with newMux and then the watchdog. log may be nil. The session's
// streams must be registered in the returned set (see streamSet).
func startSession(conn net.Conn, live Liveness, log *slog.Logger, newMux func(net.Conn) (*yamux.Session, error)) (*yamux.Session, *streamSet, error) {
	deadAfter := live.deadAfter()
	raw := rawConn(conn)
	if err := setUserTimeout(raw, userTimeout(deadAfter)); err != nil && log != nil {
		// Not fatal: the watchdog still notices a silent peer.
		log.Warn("could not set TCP_USER_TIMEOUT on the tunnel socket", "err", err)
	}
	streams := newStreamSet()
	lc := newLivenessConn(newCoalescingConn(conn), streams)
	mux, err := newMux(lc)
	if err != nil {
		return nil, nil, err
	}
	go watchLiveness(mux, lc, raw, deadAfter, log, live.OnDead)
	go func() {
		// Every other way a session ends (a Close from yamux itself).
		<-mux.CloseChan()
		streams.wake()
	}()
	return mux, streams, nil
}

// rawConn is the TCP connection under conn (TLS unwrapped).
func rawConn(conn net.Conn) net.Conn {
	if tc, ok := conn.(*tls.Conn); ok {
		conn = tc.NetConn()
	}
	if b, ok := conn.(*recordBatcher); ok {
		conn = b.Conn
	}
	return conn
}

// watchLiveness closes mux when lc has read nothing for deadAfter (and
// nothing waits unread in the socket, and this process was not itself
// stalled), and pings the peer whenever the connection has been quiet for
// a quarter of that, so a live peer always has something to answer. It
// returns when the session ends.
func watchLiveness(mux *yamux.Session, lc *livenessConn, raw net.Conn, deadAfter time.Duration, log *slog.Logger, onDead func(time.Duration)) {
	tick := deadAfter / 4
	t := time.NewTicker(tick)
	defer t.Stop()
	var pinging atomic.Bool // one ping in flight at most
	last := time.Now()
	for {
		select {
		case <-mux.CloseChan():
			return
		case <-t.C:
		}
		// Silence is judged only when this process itself was running: a
		// tick that comes late by more than a tick means it was not (a
		// loaded host, a long GC), and then the silence may be its own.
		// Bytes waiting in the socket's receive queue are life too, read
		// or not (a receive loop that did not get the CPU).
		now := time.Now()
		stalled := now.Sub(last) > 2*tick
		last = now
		silent := lc.silentFor()
		if silent >= deadAfter && !stalled && unreadBytes(raw) == 0 {
			if log != nil {
				log.Warn("tunnel peer silent: closing the session", "remote", raw.RemoteAddr().String(),
					"silent_for", silent.Round(time.Millisecond), "dead_after", deadAfter, "reason", ErrPeerSilent.Error())
			}
			if onDead != nil {
				onDead(silent)
			}
			lc.streams.wake()
			// The raw socket first: a TLS close would try to send
			// close_notify into a connection nobody reads, and yamux's
			// Close waits for its send loop, which may sit in that write.
			_ = raw.Close()
			_ = mux.Close()
			return
		}
		if silent >= tick && pinging.CompareAndSwap(false, true) {
			go func() {
				defer pinging.Store(false)
				_, _ = mux.Ping() // the answer is a read: lc records it
			}()
		}
	}
}

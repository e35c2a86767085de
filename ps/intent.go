package ps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// The intent option, as bpf/intent.c writes it into the SYN of every
// connection the redirector redirected: an RFC 6994 experimental option,
// kind 254, length 10, ExID 0x7E7E, then the IPv4 address and port the
// client dialed, in network byte order. The constants must match intent.c.
const (
	IntentOptionKind = 254
	IntentOptionLen  = 10
	IntentExID       = 0x7E7E
)

// Intent modes (--intent).
const (
	IntentOff     = "off"     // read nothing, deliver everything
	IntentVerify  = "verify"  // reset a mismatch, deliver a connection without intent
	IntentRequire = "require" // reset a mismatch and a connection without intent
)

// validIntentMode checks --intent; empty means the default, verify.
func validIntentMode(m string) error {
	switch m {
	case "", IntentOff, IntentVerify, IntentRequire:
		return nil
	}
	return fmt.Errorf("--intent %q: want off, verify or require", m)
}

var (
	errNotIPTCP  = errors.New("saved SYN is not IPv4 or IPv6 carrying TCP")
	errTruncated = errors.New("saved SYN is truncated")
	errBadOption = errors.New("saved SYN has a malformed TCP option")
)

// ParseIntent reads the intent option from a SYN as TCP_SAVED_SYN returns
// it: the IP header (IPv4 of any IHL, or IPv6 without extension headers),
// then the TCP header with its options. found is false when the SYN is
// well formed but carries no intent (for instance a client without the
// redirector); an error names what is malformed. Every length is checked
// against syn: no input can make it read out of bounds.
func ParseIntent(syn []byte) (target netip.AddrPort, found bool, err error) {
	tcp, err := tcpHeader(syn)
	if err != nil {
		return netip.AddrPort{}, false, err
	}
	if len(tcp) < 20 {
		return netip.AddrPort{}, false, errTruncated
	}
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		return netip.AddrPort{}, false, errTruncated
	}
	opts := tcp[20:doff]
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0: // end of option list
			return netip.AddrPort{}, false, nil
		case 1: // no-operation
			i++
			continue
		}
		if i+1 >= len(opts) {
			return netip.AddrPort{}, false, errBadOption
		}
		l := int(opts[i+1])
		if l < 2 || i+l > len(opts) {
			return netip.AddrPort{}, false, errBadOption
		}
		o := opts[i : i+l]
		if o[0] == IntentOptionKind && l == IntentOptionLen && binary.BigEndian.Uint16(o[2:4]) == IntentExID {
			addr := netip.AddrFrom4([4]byte(o[4:8]))
			return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(o[8:10])), true, nil
		}
		i += l
	}
	return netip.AddrPort{}, false, nil
}

// tcpHeader skips the IP header of syn.
func tcpHeader(syn []byte) ([]byte, error) {
	if len(syn) < 1 {
		return nil, errTruncated
	}
	switch syn[0] >> 4 {
	case 4:
		ihl := int(syn[0]&0x0f) * 4
		if ihl < 20 || len(syn) < ihl {
			return nil, errTruncated
		}
		if syn[9] != unix.IPPROTO_TCP {
			return nil, errNotIPTCP
		}
		return syn[ihl:], nil
	case 6:
		if len(syn) < 40 {
			return nil, errTruncated
		}
		if syn[6] != unix.IPPROTO_TCP { // extension headers: not ours
			return nil, errNotIPTCP
		}
		return syn[40:], nil
	}
	return nil, errNotIPTCP
}

// SaveSYN is the data listeners' Control function: TCP_SAVE_SYN makes the
// kernel keep each connection's SYN (headers only, about 100 bytes) until
// SavedSYN reads it or the socket closes. It must be set before the first
// SYN arrives, so on the listener before listen().
func SaveSYN(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_SAVE_SYN, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set TCP_SAVE_SYN on a data listener: %w", serr)
	}
	return nil
}

// SavedSYN returns the SYN the kernel saved for c (IP and TCP headers), and
// frees it: it can be read once. It is empty when no SYN was saved, which
// is what SYN cookies do (tcp_syncookies=2, or under a SYN flood): the
// connection is made from the cookie and the SYN is long gone.
func SavedSYN(c net.Conn) ([]byte, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil, nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil, err
	}
	// IPv6 (40) + TCP with all options (60) fit; 256 leaves room.
	buf := make([]byte, 256)
	n := uint32(len(buf))
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		// x/sys/unix's GetsockoptString stops at the first NUL byte, which
		// a header is full of: call getsockopt directly.
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_SAVED_SYN,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	}); err != nil {
		return nil, err
	}
	if errno != 0 {
		return nil, fmt.Errorf("getsockopt TCP_SAVED_SYN: %w", errno)
	}
	return buf[:min(int(n), len(buf))], nil
}

// intentAllows checks the intent in c's SYN against want, the target the
// binding of port delivers to, and says whether c may be delivered; the
// caller resets it when not. Counted in tether_ps_intent_total.
func (p *PS) intentAllows(at netip.AddrPort, c net.Conn, want, client netip.AddrPort) bool {
	mode := p.cfg.Intent
	if mode == IntentOff {
		return true
	}
	syn, err := SavedSYN(c)
	var got netip.AddrPort
	found := false
	if err == nil {
		got, found, err = ParseIntent(syn)
	}
	if err != nil {
		// A SYN we cannot read or parse carries no intent we can trust;
		// it is treated as one without intent.
		p.log.Debug("no intent read from the SYN", "at", at.String(), "client", client.String(), "err", err)
	}
	switch {
	case found && got == netip.AddrPortFrom(want.Addr().Unmap(), want.Port()):
		p.m.intent.match.Inc()
		return true
	case found:
		p.m.intent.mismatch.Inc()
		if p.m.intent.warn.allow(time.Now()) {
			p.log.Warn("connection reset: its intended target is not the one this port serves (stale route on the client)",
				"at", at.String(), "intent", got.String(), "binding", want.String(), "client", client.String(),
				"suppressed", p.m.intent.warn.takeSuppressed())
		}
		return false
	case mode == IntentRequire:
		p.m.intent.refusedAbsent.Inc()
		return false
	}
	p.m.intent.absent.Inc()
	return true
}

// intentStats is what the intent check records: tether_ps_intent_total,
// one series per result (resolved once: the check runs for every client
// connection), and the limiter of its mismatch warnings.
type intentStats struct {
	results                                *prometheus.CounterVec
	match, mismatch, absent, refusedAbsent prometheus.Counter
	warn                                   logLimiter
}

func newIntentStats() *intentStats {
	results := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_ps_intent_total",
		Help: "Client connections by the intent in their SYN (--intent): match, mismatch (reset), absent (delivered), refused_absent (reset by --intent=require).",
	}, []string{"result"})
	return &intentStats{results: results,
		match: results.WithLabelValues("match"), mismatch: results.WithLabelValues("mismatch"),
		absent: results.WithLabelValues("absent"), refusedAbsent: results.WithLabelValues("refused_absent")}
}

// logLimiter lets one line through per second and counts the rest, so that
// a client hammering a stale route cannot flood the log.
type logLimiter struct {
	last       atomic.Int64 // unix nanoseconds of the last line let through
	suppressed atomic.Int64
}

func (l *logLimiter) allow(now time.Time) bool {
	last := l.last.Load()
	if now.UnixNano()-last < int64(time.Second) || !l.last.CompareAndSwap(last, now.UnixNano()) {
		l.suppressed.Add(1)
		return false
	}
	return true
}

func (l *logLimiter) takeSuppressed() int64 { return l.suppressed.Swap(0) }

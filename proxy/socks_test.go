package proxy

import (
	"bytes"
	"slices"
	"testing"
	"time"
)

// TestSOCKSClientsGetTheExactAnswerAndAClose plays every kind of SOCKS5
// client against the proxy on a fake clock: the bytes it answers must be
// exactly what RFC 1928/1929 and the proxy's reply codes say, and the
// connection must close at once, or, when the client stalls mid-message, at
// the handshake deadline and not a moment later.
func TestSOCKSClientsGetTheExactAnswerAndAClose(t *testing.T) {
	greet := []byte{5, 1, 0}
	req := func(cmd, atyp byte, addr ...byte) []byte { return append([]byte{5, cmd, 0, atyp}, addr...) }
	cat := func(parts ...[]byte) []byte { return slices.Concat(parts...) }
	ok := []byte{5, 0}
	port := []byte{0x23, 0x8c} // 9100
	users := map[string]string{"ops": "s3cret"}
	userPass := func(u, p string) []byte {
		return cat([]byte{1, byte(len(u))}, []byte(u), []byte{byte(len(p))}, []byte(p))
	}
	cases := []struct {
		name     string
		users    map[string]string
		in       []byte
		want     []byte
		deadline bool // closed by the handshake deadline rather than at once
	}{
		{name: "malformed greeting: an HTTP request", in: []byte("GET / HTTP/1.1\r\n\r\n"), want: nil},
		{name: "SOCKS4 greeting", in: []byte{4, 1, 0, 80, 127, 0, 0, 1, 0}, want: nil},
		{name: "greeting without methods", in: []byte{5, 0}, want: nil},
		{name: "stalled greeting", in: []byte{5}, want: nil, deadline: true},
		{name: "stalled method list", in: []byte{5, 3, 0}, want: nil, deadline: true},
		{name: "no acceptable method", in: []byte{5, 1, 2}, want: []byte{5, 0xff}},
		{name: "truncated request: half an IPv4 address", in: cat(greet, req(1, 1, 127)), want: ok, deadline: true},
		{name: "truncated request: no port", in: cat(greet, req(1, 1, 127, 77, 0, 1)), want: ok, deadline: true},
		{name: "truncated request: no domain length", in: cat(greet, req(1, 3)), want: ok, deadline: true},
		{name: "truncated request: half a domain", in: cat(greet, req(1, 3, 9, 'l', 'o')), want: ok, deadline: true},
		{name: "request of version 4", in: cat(greet, []byte{4, 1, 0, 1, 127, 77, 0, 1}, port), want: cat(ok, socksReply(repGeneralFailure))},
		{name: "empty domain name", in: cat(greet, req(1, 3, 0), port), want: cat(ok, socksReply(repGeneralFailure))},
		{name: "unknown address type", in: cat(greet, req(1, 9, 1, 2, 3, 4, 0, 80)), want: cat(ok, socksReply(repAddrNotSupported))},
		{name: "bind", in: cat(greet, req(cmdBind, 1, 127, 77, 0, 1), port), want: cat(ok, socksReply(repCommandNotSupported))},
		{name: "udp associate", in: cat(greet, req(cmdUDPAssociate, 1, 127, 77, 0, 1), port), want: cat(ok, socksReply(repCommandNotSupported))},
		{name: "target without a route", in: cat(greet, req(1, 1, 127, 77, 0, 9), []byte{0, 1}), want: cat(ok, socksReply(repNotAllowed))},
		{name: "target whose backends are draining or dead", in: cat(greet, req(1, 1, 127, 77, 0, 2), port), want: cat(ok, socksReply(repHostUnreachable))},
		{name: "target whose only backend refuses", in: cat(greet, req(1, 1, 127, 77, 0, 3), port), want: cat(ok, socksReply(repConnectionRefused))},
		{name: "name that does not resolve", in: cat(greet, req(1, 3, 12), []byte("nowhere.test"), port), want: cat(ok, socksReply(repHostUnreachable))},
		{name: "name without a route", in: cat(greet, req(1, 3, 9), []byte("localhost"), port), want: cat(ok, socksReply(repNotAllowed))},
		{name: "routed target", in: cat(greet, req(1, 1, 127, 77, 0, 1), port), want: cat(ok, socksReply(repSuccess), []byte(upstreamGreeting))},
		{name: "routed target as an IPv4-mapped IPv6 address", in: cat(greet, req(1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 77, 0, 1), port), want: cat(ok, socksReply(repSuccess), []byte(upstreamGreeting))},
		{name: "routed target as a bracketed literal name", in: cat(greet, req(1, 3, 12), []byte("[127.77.0.1]"), port), want: cat(ok, socksReply(repSuccess), []byte(upstreamGreeting))},

		{name: "auth: client offers only no-auth", users: users, in: greet, want: []byte{5, 0xff}},
		{name: "auth: bad sub-negotiation version", users: users, in: cat([]byte{5, 1, 2}, []byte{5, 3, 'o', 'p', 's'}), want: []byte{5, 2}},
		{name: "auth: wrong password", users: users, in: cat([]byte{5, 1, 2}, userPass("ops", "wrong")), want: []byte{5, 2, 1, 1}},
		{name: "auth: unknown user", users: users, in: cat([]byte{5, 1, 2}, userPass("root", "s3cret")), want: []byte{5, 2, 1, 1}},
		{name: "auth: stalled password", users: users, in: cat([]byte{5, 1, 2}, []byte{1, 3, 'o', 'p', 's', 6, 's'}), want: []byte{5, 2}, deadline: true},
		{name: "auth: right password, target without a route", users: users, in: cat([]byte{5, 1, 2}, userPass("ops", "s3cret"), req(1, 1, 127, 77, 0, 9), port), want: cat([]byte{5, 2, 1, 0}, socksReply(repNotAllowed))},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tp := newTestProxy(t, c.users)
			if got := expectSOCKS(c.in, c.users, tp.routes); !bytes.Equal(got.out, c.want) || got.stalled != c.deadline {
				t.Fatalf("the reference model disagrees with this case: %x stalled=%v", got.out, got.stalled)
			}
			run := runSOCKS(t, tp, c.in)
			if run.err != nil {
				t.Fatalf("the proxy neither answered nor closed within a minute (handshake deadline %v): read: %v, got %x so far", handshakeDeadline, run.err, run.out)
			}
			if want := expectSOCKS(c.in, c.users, tp.routes); !want.matches(run.out) {
				t.Errorf("the proxy answered %x, want exactly %x (or that and then %x)", run.out, c.want, want.late)
			}
			wantAt := time.Duration(0)
			if c.deadline {
				wantAt = handshakeDeadline
			}
			if run.closedAt != wantAt {
				t.Errorf("the proxy closed the connection after %v, want %v", run.closedAt, wantAt)
			}
			wantContacts := int64(0)
			if bytes.Contains(c.want, []byte(upstreamGreeting)) {
				wantContacts = 1
			}
			if run.contacts != wantContacts {
				t.Errorf("the upstream got %d connections, want %d", run.contacts, wantContacts)
			}
		})
	}
}

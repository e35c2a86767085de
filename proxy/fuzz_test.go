package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net/http"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// Seed corpora live in testdata/fuzz/<Target>/; scripts/fuzz-smoke.sh runs
// every target for a few seconds.

// FuzzSOCKSRequest plays any bytes against the SOCKS5 side, with and
// without username/password, and holds the proxy to a reference model of
// RFC 1928/1929: it answers exactly the bytes the model says (a well-formed
// method selection, sub-negotiation status and reply with the documented
// code), closes at once or, for a client that stalls mid-message, at the
// handshake deadline, never later, and reaches the upstream only for a
// target with a live route. Whatever the request parser accepts must also
// survive an encode and a second parse unchanged.
func FuzzSOCKSRequest(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 127, 77, 0, 1, 0x23, 0x8c}, false)
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 9, 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't', 0, 80}, false)
	f.Add([]byte{5, 1, 0, 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 77, 0, 1, 0x23, 0x8c}, false)
	f.Add([]byte{5, 1, 2, 1, 3, 'o', 'p', 's', 6, 's', '3', 'c', 'r', 'e', 't', 5, 1, 0, 1, 127, 77, 0, 1, 0x23, 0x8c}, true)
	f.Add([]byte{5, 2, 0, 2, 1, 3, 'o', 'p', 's', 1, 'x'}, true)
	f.Add([]byte{4, 1, 0, 80}, false)
	f.Add([]byte{5, 0}, false)
	f.Add([]byte{}, false)
	open := newTestProxy(f, nil)
	locked := newTestProxy(f, map[string]string{"ops": "s3cret"})
	f.Fuzz(func(t *testing.T, in []byte, auth bool) {
		tp := open
		if auth {
			tp = locked
		}
		checkSOCKSParserRoundTrip(t, in)
		want := expectSOCKS(in, tp.users, tp.routes)
		run := runSOCKS(t, tp, in)
		if run.err != nil {
			t.Fatalf("input %x: the proxy neither answered nor closed within a minute (handshake deadline %v): %v, got %x", in, handshakeDeadline, run.err, run.out)
		}
		if !want.matches(run.out) {
			t.Fatalf("input %x: the proxy answered %x, want exactly %x (or that and then %x)", in, run.out, want.out, want.late)
		}
		wantAt := time.Duration(0)
		if want.stalled {
			wantAt = handshakeDeadline
		}
		if run.closedAt != wantAt {
			t.Fatalf("input %x: the proxy closed after %v, want %v", in, run.closedAt, wantAt)
		}
		if wantContacts := int64(map[bool]int{true: 1}[want.routed]); run.contacts != wantContacts {
			t.Fatalf("input %x: the upstream got %d connections, want %d (only a live route leads there)", in, run.contacts, wantContacts)
		}
	})
}

// checkSOCKSParserRoundTrip parses in as the handshake's client side, and
// re-encodes and re-parses the request the parser accepts.
func checkSOCKSParserRoundTrip(t *testing.T, in []byte) {
	t.Helper()
	r := bytes.NewReader(in)
	methods, err := readGreeting(r)
	if err != nil {
		return
	}
	if len(methods) == 0 {
		t.Fatal("a greeting without methods was accepted")
	}
	if bytes.IndexByte(methods, methodUserPass) >= 0 {
		if _, _, err := readUserPass(r); err != nil {
			return
		}
	}
	rest := in[len(in)-r.Len():]
	req, err := readRequest(r)
	if err != nil {
		return
	}
	raw := rest[:len(rest)-r.Len()]
	enc := encodeSOCKSRequest(req)
	again, err := readRequest(bytes.NewReader(enc))
	if err != nil || !reflect.DeepEqual(again, req) {
		t.Fatalf("request %x parsed as %+v, encoded as %x, parsed again as %+v, %v", raw, req, enc, again, err)
	}
	// Every request has one encoding but for an IPv4-mapped IPv6 address
	// (the parser reads it as IPv4) and a name that is an address literal
	// (the encoder sends the address); RSV is not kept.
	_, addrName := sendsAsAddr(req.host)
	if raw[3] == atypIPv6 && netip.AddrFrom16([16]byte(raw[4:20])).Is4In6() || raw[3] == atypDomain && addrName {
		return
	}
	if want := slices.Concat(raw[:2], []byte{0}, raw[3:]); !bytes.Equal(enc, want) {
		t.Fatalf("request %x re-encodes as %x (%+v)", raw, enc, req)
	}
}

// sendsAsAddr says whether host goes as an address: an IP literal in its
// canonical form, not IPv4-mapped.
func sendsAsAddr(host string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(host)
	return a, err == nil && a.String() == host && a.Zone() == "" && !a.Is4In6()
}

// encodeSOCKSRequest is the client side of readRequest: an IP literal goes
// as an address, anything else as a name.
func encodeSOCKSRequest(req socksRequest) []byte {
	b := []byte{socksVersion, req.cmd, 0}
	switch a, ok := sendsAsAddr(req.host); {
	case ok && a.Is4():
		b = append(append(b, atypIPv4), a.AsSlice()...)
	case ok:
		b = append(append(b, atypIPv6), a.AsSlice()...)
	default:
		b = append(append(b, atypDomain, byte(len(req.host))), req.host...)
	}
	return binary.BigEndian.AppendUint16(b, req.port)
}

// httpStatuses is every status a client of the HTTP side may get: the
// proxy's own (httpStatus, the handler) and the ones net/http's server
// answers a request it cannot parse with.
var httpStatuses = map[int]bool{
	http.StatusOK: true, http.StatusBadRequest: true, http.StatusForbidden: true,
	http.StatusProxyAuthRequired: true, http.StatusBadGateway: true, http.StatusServiceUnavailable: true,
	http.StatusRequestHeaderFieldsTooLarge: true, http.StatusNotImplemented: true,
	http.StatusHTTPVersionNotSupported: true, http.StatusExpectationFailed: true,
}

// FuzzHTTPRequest sends any bytes to the HTTP side, with and without
// Proxy-Authorization required, and checks that the answer comes (or the
// connection closes) within 5 seconds, parses as HTTP/1.1 with a status from
// the documented set, and, when the proxy's handler answered the first
// request, matches a reference model: 407 without the right credentials,
// 400 for anything but CONNECT or an absolute http:// URL ("OPTIONS *"
// included: net/http's own answer to it is turned off), then 200, 403,
// 503 or 502 as the route table says. Only a target with a live route
// reaches the upstream.
func FuzzHTTPRequest(f *testing.F) {
	f.Add([]byte("GET http://127.77.0.1:9100/ HTTP/1.1\r\nHost: 127.77.0.1:9100\r\n\r\n"), false)
	f.Add([]byte("CONNECT 127.77.0.1:9100 HTTP/1.1\r\nHost: 127.77.0.1:9100\r\nProxy-Authorization: Basic b3BzOnMzY3JldA==\r\n\r\n"), true)
	f.Add([]byte("CONNECT [::1]:0 HTTP/1.1\r\n\r\n"), false)
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), false)
	open := newTestProxy(f, nil)
	open.startHTTP(f)
	locked := newTestProxy(f, map[string]string{"ops": "s3cret"})
	locked.startHTTP(f)
	f.Fuzz(func(t *testing.T, in []byte, auth bool) {
		tp := open
		if auth {
			tp = locked
		}
		run := runHTTP(t, tp, in)
		if run.err != nil {
			t.Fatalf("input %q: no answer and close within 5s: %v (got %q)", in, run.err, run.raw)
		}
		if run.contacts > 0 && !anyRoutedRequest(in, tp) {
			t.Fatalf("input %q: the upstream was reached, but no request names a target with a live route (got %q)", in, run.raw)
		}
		if run.resp == nil {
			return // closed without an answer: input that is no request
		}
		status := run.resp.StatusCode
		if !httpStatuses[status] {
			t.Fatalf("input %q: status %d is not one the proxy documents (got %q)", in, status, run.raw)
		}
		req, _ := firstRequest(in)
		byHandler := strings.HasPrefix(run.body, "tether proxy: ") || status == http.StatusOK || status == http.StatusProxyAuthRequired
		if req == nil || !byHandler {
			return // net/http refused it before the proxy saw it
		}
		wantStatus, rt := expectHTTP(req, tp.users, tp.routes)
		if wantStatus == http.StatusOK && req.Method != http.MethodConnect && status == http.StatusBadGateway &&
			!strings.Contains(run.body, ErrNoRoute.Error()) && !strings.Contains(run.body, ErrNoLiveBackend.Error()) {
			// The forwarding transport refused to send this request on
			// (an invalid Host header, say): a 502 that is no routing error.
			return
		}
		if status != wantStatus {
			t.Fatalf("input %q: status %d, want %d (got %q)", in, status, wantStatus, run.raw)
		}
		fromUpstream := run.contacts > 0 && (req.Method == http.MethodHead || strings.Contains(run.body, "upstream\n"))
		if status == http.StatusOK && (rt != routeLive || !fromUpstream) {
			t.Fatalf("input %q: a 200 that did not come from the upstream (%d connections): %q", in, run.contacts, run.raw)
		}
	})
}

// anyRoutedRequest says whether any request in in names a target with a
// live route, as the model reads it.
func anyRoutedRequest(in []byte, tp *testProxy) bool {
	br := bufio.NewReader(bytes.NewReader(in))
	for {
		r, err := http.ReadRequest(br)
		if err != nil {
			return false
		}
		if _, rt := expectHTTP(r, nil, tp.routes); rt == routeLive {
			return true
		}
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			return false
		}
	}
}

package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tether-net/tether/registry"
)

// TestMain keeps every test of this package on loopback: names resolve from
// /etc/hosts only ("localhost"), never through a DNS server, so neither a
// test nor a fuzz input can send a query off the machine.
func TestMain(m *testing.M) {
	net.DefaultResolver.PreferGo = true
	net.DefaultResolver.Dial = func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("no DNS in proxy tests: names resolve from /etc/hosts only")
	}
	// Set the resolver's lazily built state up outside any synctest bubble,
	// so that no bubble owns it.
	_, _ = net.DefaultResolver.LookupNetIP(context.Background(), "ip", "localhost")
	_, _ = net.DefaultResolver.LookupNetIP(context.Background(), "ip", "no-such-host.invalid")
	os.Exit(m.Run())
}

// handshakeDeadline is the bound handleSOCKS puts on a whole negotiation.
const handshakeDeadline = 10 * time.Second

// routeTable is a fixed route table standing in for registry.Mirror.
type routeTable map[netip.AddrPort][]registry.BackendState

func (r routeTable) Lookup(t netip.AddrPort) ([]registry.BackendState, bool) {
	b, ok := r[t]
	return b, ok
}

// Targets of the test route table.
var (
	routedTarget   = netip.MustParseAddrPort("127.77.0.1:9100")   // one live backend: the upstream
	routedTarget6  = netip.MustParseAddrPort("[2001:db8::1]:443") // one live backend: the upstream
	drainingTarget = netip.MustParseAddrPort("127.77.0.2:9100")   // a draining and a dead backend
	refusedTarget  = netip.MustParseAddrPort("127.77.0.3:9100")   // one live backend that refuses
	unroutedTarget = netip.MustParseAddrPort("127.77.0.9:1")      // no route
)

// upstreamGreeting is what the upstream sends on every connection before
// closing its side.
const upstreamGreeting = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nupstream\n"

// upstreamGrace is how long the upstream waits for a client's first byte
// before it speaks anyway.
const upstreamGrace = 200 * time.Millisecond

// upstream is the one backend that accepts: a loopback listener counting
// the connections it gets. Only routes lead to it.
type upstream struct {
	addr     netip.AddrPort
	contacts atomic.Int64
}

func startUpstream(tb testing.TB) *upstream {
	tb.Helper()
	return startUpstreamOn(tb, "127.0.0.1:0")
}

// startUpstreamOn starts an upstream listening on addr.
func startUpstreamOn(tb testing.TB, addr string) *upstream {
	tb.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	u := &upstream{addr: netip.MustParseAddrPort(ln.Addr().String())}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.contacts.Add(1)
			go func() {
				defer c.Close()
				// Speak once the client has (or upstreamGrace has passed):
				// the proxy's forwarding transport fails a connection that
				// answers before its request is sent ("unsolicited
				// response", a 502 about 1 time in 60), and a SOCKS client
				// of these tests may send nothing at all.
				_ = c.SetReadDeadline(time.Now().Add(upstreamGrace))
				var first [1]byte
				_, _ = c.Read(first[:])
				_, _ = io.WriteString(c, upstreamGreeting)
				_ = c.(*net.TCPConn).CloseWrite()
				// Drain, so that closing sends a FIN and not a reset that
				// could overtake the greeting.
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return u
}

// refusingPS names the backend of refusedTarget.
const refusingPS = "ps-refusing"

// refusingAddr returns a loopback address nothing listens on.
func refusingAddr(tb testing.TB) netip.AddrPort {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	a := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	return a
}

// testRoutes builds the test route table around up.
func testRoutes(tb testing.TB, up *upstream) routeTable {
	live := registry.BackendState{PSID: "ps1", Address: up.addr, AgentID: "a1", Live: true}
	return routeTable{
		routedTarget:  {live},
		routedTarget6: {live},
		drainingTarget: {
			{PSID: "ps1", Address: up.addr, AgentID: "a2", Live: true, Draining: true},
			{PSID: "ps2", Address: up.addr, AgentID: "a2"},
		},
		refusedTarget: {{PSID: refusingPS, Address: refusingAddr(tb), AgentID: "a3", Live: true}},
	}
}

// testProxy is a proxy over the test route table, without Redis.
type testProxy struct {
	*Proxy
	up     *upstream
	routes routeTable
	http   string // address of the HTTP listener, when started
}

func newTestProxy(tb testing.TB, users map[string]string) *testProxy {
	tb.Helper()
	up := startUpstream(tb)
	routes := testRoutes(tb, up)
	p, err := newWithLookup(Config{DialTimeout: 2 * time.Second}, routes)
	if err != nil {
		tb.Fatal(err)
	}
	p.dialControl = loopbackOnly
	p.users = users
	return &testProxy{Proxy: p, up: up, routes: routes}
}

// loopbackOnly refuses to dial anything but loopback: a test proxy sends
// no packet off the machine, even when the check under test is broken.
func loopbackOnly(_, address string, _ syscall.RawConn) error {
	if ap, err := netip.ParseAddrPort(address); err != nil || !ap.Addr().Unmap().IsLoopback() {
		return fmt.Errorf("test proxy: dial %s refused: tests stay on loopback", address)
	}
	return nil
}

// startHTTP runs the proxy's HTTP listener on loopback until the test ends.
func (tp *testProxy) startHTTP(tb testing.TB) {
	tb.Helper()
	tp.cfg.HTTP = "127.0.0.1:0"
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = tp.Run(ctx); close(done) }()
	tb.Cleanup(func() { cancel(); <-done })
	a, err := tp.Addr(ctx, "http")
	if err != nil {
		tb.Fatal(err)
	}
	tp.http = a.String()
}

// socksRun is what a SOCKS client saw of one connection.
type socksRun struct {
	out      []byte        // every byte the proxy sent
	closedAt time.Duration // when the proxy closed the connection, on the fake clock
	err      error         // the client's read error; a deadline error means the proxy hung
	contacts int64         // connections the upstream got
}

// runSOCKS plays in against handleSOCKS over an in-memory connection, on
// synctest's fake clock: a proxy that closes on its own does so at 0, one
// that waits for more input closes at the handshake deadline, and one that
// hangs is caught by the client's one-minute read deadline, all at once in
// real time. The client never half-closes: input that runs out mid-message
// is a stalled client.
func runSOCKS(t *testing.T, tp *testProxy, in []byte) socksRun {
	t.Helper()
	var run socksRun
	before := tp.up.contacts.Load()
	synctest.Test(t, func(t *testing.T) {
		cli, srv := net.Pipe()
		start := time.Now()
		done := make(chan struct{})
		go func() { tp.handleSOCKS(t.Context(), srv); close(done) }()
		if len(in) > 0 {
			// Ends once the proxy has read everything or closed.
			go func() { _, _ = cli.Write(in) }()
		}
		_ = cli.SetReadDeadline(start.Add(time.Minute))
		run.out, run.err = io.ReadAll(cli)
		run.closedAt = time.Since(start)
		cli.Close()
		<-done
	})
	run.contacts = tp.up.contacts.Load() - before
	return run
}

// socksWant is what the SOCKS5 protocol (RFC 1928, RFC 1929) and the proxy's
// documented reply codes say a client sending some bytes must see.
type socksWant struct {
	out     []byte
	stalled bool // the input ends mid-message: closed at the handshake deadline
	routed  bool // the request reaches the upstream
	// late may follow out when stalled: a reply the proxy writes as the
	// deadline strikes, which the connection may or may not still carry.
	late []byte
}

// matches says whether a client that saw out saw what w says.
func (w socksWant) matches(out []byte) bool {
	return bytes.Equal(out, w.out) || w.late != nil && bytes.Equal(out, slices.Concat(w.out, w.late))
}

func socksReply(rep byte) []byte { return []byte{5, rep, 0, 1, 0, 0, 0, 0, 0, 0} }

// expectSOCKS is a reference model of the proxy's SOCKS5 side, written from
// the RFCs and the proxy's reply codes rather than from socks.go.
func expectSOCKS(in []byte, users map[string]string, routes routeTable) socksWant {
	var w socksWant
	take := func(n int) ([]byte, bool) {
		if len(in) < n {
			w.stalled = true
			return nil, false
		}
		b := in[:n]
		in = in[n:]
		return b, true
	}
	// Greeting: VER NMETHODS METHODS.
	g, ok := take(2)
	if !ok {
		return w
	}
	if g[0] != 5 || g[1] == 0 {
		return w // not SOCKS5: closed without a word
	}
	methods, ok := take(int(g[1]))
	if !ok {
		return w
	}
	method := byte(methodNoAuth)
	if users != nil {
		method = methodUserPass
	}
	if bytes.IndexByte(methods, method) < 0 {
		w.out = []byte{5, methodNoAcceptable}
		return w
	}
	w.out = []byte{5, method}
	if users != nil {
		// RFC 1929: VER ULEN UNAME PLEN PASSWD.
		v, ok := take(1)
		if !ok {
			return w
		}
		if v[0] != 1 {
			return w
		}
		var creds [2]string
		for i := range creds {
			n, ok := take(1)
			if !ok {
				return w
			}
			s, ok := take(int(n[0]))
			if !ok {
				return w
			}
			creds[i] = string(s)
		}
		if pw, known := users[creds[0]]; !known || pw != creds[1] {
			w.out = append(w.out, 1, 1)
			return w
		}
		w.out = append(w.out, 1, 0)
	}
	// Request: VER CMD RSV ATYP DST.ADDR DST.PORT.
	h, ok := take(4)
	if !ok {
		return w
	}
	if h[0] != 5 {
		w.out = append(w.out, socksReply(repGeneralFailure)...)
		return w
	}
	var host string
	switch h[3] {
	case atypIPv4:
		a, ok := take(4)
		if !ok {
			return w
		}
		host = netip.AddrFrom4([4]byte(a)).String()
	case atypIPv6:
		a, ok := take(16)
		if !ok {
			return w
		}
		host = netip.AddrFrom16([16]byte(a)).String()
	case atypDomain:
		n, ok := take(1)
		if !ok {
			// The proxy counts a missing length as an empty name.
			w.late = socksReply(repGeneralFailure)
			return w
		}
		if n[0] == 0 {
			w.out = append(w.out, socksReply(repGeneralFailure)...)
			return w
		}
		name, ok := take(int(n[0]))
		if !ok {
			return w
		}
		host = string(name)
	default:
		w.out = append(w.out, socksReply(repAddrNotSupported)...)
		return w
	}
	pb, ok := take(2)
	if !ok {
		return w
	}
	if h[1] != cmdConnect {
		w.out = append(w.out, socksReply(repCommandNotSupported)...)
		return w
	}
	port := uint16(pb[0])<<8 | uint16(pb[1])
	switch routeOf(host, port, routes) {
	case routeLive:
		w.routed = true
		w.out = append(w.out, socksReply(repSuccess)...)
		w.out = append(w.out, upstreamGreeting...)
	case routeDraining, routeUnresolvable:
		w.out = append(w.out, socksReply(repHostUnreachable)...)
	case routeRefusing:
		w.out = append(w.out, socksReply(repConnectionRefused)...)
	default:
		w.out = append(w.out, socksReply(repNotAllowed)...)
	}
	return w
}

// route is what the route table says about a host and port.
type route int

const (
	routeNone route = iota
	routeLive
	routeDraining
	routeRefusing
	routeUnresolvable
	routeBadPort // HTTP only: a port that is not 1-65535
)

// routeOf looks host (an IP literal, bracketed or not, or a name from
// /etc/hosts) up: the first address with a route decides.
func routeOf(host string, port uint16, routes routeTable) route {
	var addrs []netip.Addr
	if a, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		addrs = []netip.Addr{a}
	} else {
		var err error
		addrs, err = net.DefaultResolver.LookupNetIP(context.Background(), "ip", host)
		if err != nil || len(addrs) == 0 {
			return routeUnresolvable
		}
	}
	for _, a := range addrs {
		backends, ok := routes.Lookup(netip.AddrPortFrom(a.Unmap(), port))
		if !ok {
			continue
		}
		var live, refusing int
		for _, b := range backends {
			if b.Live && !b.Draining {
				live++
				if b.PSID == refusingPS {
					refusing++
				}
			}
		}
		switch {
		case live == 0:
			return routeDraining
		case refusing == live:
			return routeRefusing
		}
		return routeLive
	}
	return routeNone
}

// httpRun is what an HTTP client saw of one connection.
type httpRun struct {
	raw      []byte
	resp     *http.Response // the first final response; nil when none came
	body     string
	err      error // a read error: a deadline error means the proxy hung
	contacts int64
}

// runHTTP sends in to the proxy's HTTP listener and reads until the proxy
// closes, within 5 seconds. The client half-closes once it has sent all it
// will (at once when in holds no whole request, else after the first
// answer): net/http cancels a request whose client half-closed, so a client
// that did so before its answer would only ever see "context canceled".
func runHTTP(t testing.TB, tp *testProxy, in []byte) (run httpRun) {
	t.Helper()
	before := tp.up.contacts.Load()
	c, err := net.Dial("tcp", tp.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, whole := firstRequest(in)
	go func() {
		_, _ = c.Write(in)
		if !whole {
			_ = c.(*net.TCPConn).CloseWrite()
		}
	}()
	var raw bytes.Buffer
	br := bufio.NewReader(io.TeeReader(c, &raw))
	defer func() { run.raw = raw.Bytes() }()
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			// No (more) answer: the proxy must have closed.
			_, err = io.Copy(io.Discard, br)
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				run.err = err
			case raw.Len() > 0:
				run.err = fmt.Errorf("not an HTTP response: %q", raw.Bytes())
			}
			run.contacts = tp.up.contacts.Load() - before
			return run
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 {
			continue // 100 Continue: an interim answer
		}
		run.resp = resp
		_ = c.(*net.TCPConn).CloseWrite()
		// The rest: the proxy's own answer's body, or after a tunnel's 200
		// the upstream's bytes; then the close.
		b, err := io.ReadAll(br)
		run.body = string(b)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			run.err = err
		}
		run.contacts = tp.up.contacts.Load() - before
		return run
	}
}

// firstRequest parses the first request of in, and says whether in holds
// all of it, body included.
func firstRequest(in []byte) (*http.Request, bool) {
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(in)))
	if err != nil {
		return nil, false
	}
	_, err = io.Copy(io.Discard, r.Body)
	return r, err == nil
}

// expectHTTP is a reference model of the proxy's HTTP side for one parsed
// request: the status its handler must answer and whether it reaches the
// upstream.
func expectHTTP(r *http.Request, users map[string]string, routes routeTable) (int, route) {
	if users != nil && !basicAuthOK(r, users) {
		return http.StatusProxyAuthRequired, routeNone
	}
	var hostport string
	switch {
	case r.Method == http.MethodConnect:
		hostport = r.Host
	case r.URL.IsAbs() && r.URL.Scheme == "http":
		port := r.URL.Port()
		if port == "" {
			port = "80"
		}
		hostport = net.JoinHostPort(r.URL.Hostname(), port)
	default:
		return http.StatusBadRequest, routeNone
	}
	host, ps, err := net.SplitHostPort(hostport)
	if err != nil {
		return http.StatusBadGateway, routeBadPort
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil || port == 0 {
		return http.StatusBadGateway, routeBadPort
	}
	switch rt := routeOf(host, uint16(port), routes); rt {
	case routeLive:
		return http.StatusOK, rt
	case routeDraining:
		return http.StatusServiceUnavailable, rt
	case routeNone:
		return http.StatusForbidden, rt
	default:
		return http.StatusBadGateway, rt
	}
}

func basicAuthOK(r *http.Request, users map[string]string) bool {
	raw, ok := strings.CutPrefix(r.Header.Get("Proxy-Authorization"), "Basic ")
	if !ok {
		return false
	}
	dec, err := base64.StdEncoding.DecodeString(raw)
	if err != nil {
		return false
	}
	u, pw, ok := strings.Cut(string(dec), ":")
	want, known := users[u]
	return ok && known && want == pw
}

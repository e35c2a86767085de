package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/internal/testutil"
)

// fakeHost is a host with a public address, a link-local one and loopback.
func fakeHost() ([]net.Addr, error) {
	var out []net.Addr
	for _, s := range []string{"127.0.0.1/8", "::1/128", "192.0.2.2/24", "fd00::2/64", "fe80::fc:ff:fe00:1/64"} {
		ip, n, _ := net.ParseCIDR(s)
		out = append(out, &net.IPNet{IP: ip, Mask: n.Mask})
	}
	return out, nil
}

func TestPassthroughPolicyKeepsToPublicAddressesAndNamedRanges(t *testing.T) {
	cases := []struct {
		cidrs []string
		addr  string
		want  string // "" = allowed
	}{
		{nil, "127.0.0.1", reasonLoopback},
		{nil, "127.77.0.50", reasonLoopback},
		{nil, "::1", reasonLoopback},
		{nil, "::ffff:127.0.0.1", reasonLoopback},
		{nil, "169.254.1.1", reasonLinkLocal},
		{nil, "169.254.169.254", reasonLinkLocal},
		{nil, "fe80::1", reasonLinkLocal},
		{nil, "0.0.0.0", reasonUnspecified},
		{nil, "::", reasonUnspecified},
		{nil, "224.0.0.1", reasonMulticast},
		{nil, "ff02::1", reasonMulticast},
		{nil, "255.255.255.255", reasonBroadcast},
		{nil, "192.0.2.2", reasonOwnAddress},
		{nil, "::ffff:192.0.2.2", reasonOwnAddress},
		{nil, "fd00::2", reasonOwnAddress},
		{nil, "fe80::fc:ff:fe00:1", reasonOwnAddress},
		{nil, "192.0.2.3", ""},
		{nil, "10.1.2.3", ""},
		{nil, "2001:db8::1", ""},
		// A range named inside a special one opens that range, and only it.
		{[]string{"127.77.0.0/16"}, "127.77.0.50", ""},
		{[]string{"127.77.0.0/16"}, "::ffff:127.77.0.50", ""},
		{[]string{"127.77.0.0/16"}, "127.0.0.1", reasonLoopback},
		{[]string{"127.77.0.0/16"}, "10.1.2.3", reasonOutside},
		{[]string{"127.0.0.0/8"}, "127.0.0.1", ""},
		{[]string{"169.254.169.254"}, "169.254.169.254", ""},
		{[]string{"169.254.169.254"}, "169.254.1.1", reasonLinkLocal},
		// A catch-all is no naming of a special range.
		{[]string{"0.0.0.0/0", "::/0"}, "127.0.0.1", reasonLoopback},
		{[]string{"0.0.0.0/0", "::/0"}, "::1", reasonLoopback},
		{[]string{"0.0.0.0/0", "::/0"}, "169.254.1.1", reasonLinkLocal},
		{[]string{"0.0.0.0/0", "::/0"}, "10.1.2.3", ""},
		{[]string{"10.0.0.0/8"}, "10.1.2.3", ""},
		{[]string{"10.0.0.0/8"}, "192.0.2.3", reasonOutside},
		// The host's own addresses stay closed whatever is named, but for
		// loopback.
		{[]string{"192.0.2.0/24"}, "192.0.2.2", reasonOwnAddress},
		{[]string{"192.0.2.0/24"}, "192.0.2.3", ""},
		{[]string{"fe80::/10"}, "fe80::fc:ff:fe00:1", reasonOwnAddress},
		{[]string{"fe80::/10"}, "fe80::1", ""},
	}
	for _, c := range cases {
		allow, err := cidr.Parse(c.cidrs)
		if err != nil {
			t.Fatal(err)
		}
		pp := passthroughPolicy{allow: allow, host: &hostAddrs{read: fakeHost}}
		if got := pp.check(netip.MustParseAddr(c.addr)); got != c.want {
			t.Errorf("--passthrough-cidrs %q, target %s: got %q, want %q", c.cidrs, c.addr, got, c.want)
		}
	}
}

func TestPassthroughRefusesEverythingButLoopbackRulesWhenTheHostsAddressesAreUnknown(t *testing.T) {
	broken := func() ([]net.Addr, error) { return nil, errors.New("netlink: permission denied") }
	pp := passthroughPolicy{host: &hostAddrs{read: broken}}
	for addr, want := range map[string]string{"10.1.2.3": reasonHostUnknown, "127.0.0.1": reasonLoopback} {
		if got := pp.check(netip.MustParseAddr(addr)); got != want {
			t.Errorf("%s: got %q, want %q", addr, got, want)
		}
	}
}

func TestHostAddressesAreReReadEverySecondAtMost(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var reads atomic.Int64
		extra := netip.MustParseAddr("198.18.0.7")
		h := &hostAddrs{read: func() ([]net.Addr, error) {
			addrs, _ := fakeHost()
			if reads.Add(1) > 1 {
				addrs = append(addrs, &net.IPAddr{IP: extra.AsSlice()})
			}
			return addrs, nil
		}}
		for range 100 {
			if own, err := h.contains(extra); own || err != nil {
				t.Fatalf("an address the host does not have yet: %v %v", own, err)
			}
		}
		if n := reads.Load(); n != 1 {
			t.Fatalf("100 checks within a second read the addresses %d times, want 1", n)
		}
		time.Sleep(hostAddrsTTL + time.Millisecond)
		if own, err := h.contains(extra); !own || err != nil {
			t.Fatalf("an address the host gained a second ago is not seen: %v %v", own, err)
		}
		// A failed re-read keeps the last good set.
		h.read = func() ([]net.Addr, error) { return nil, errors.New("netlink: no buffer space") }
		time.Sleep(hostAddrsTTL + time.Millisecond)
		if own, err := h.contains(extra); !own || err != nil {
			t.Fatalf("after a failed re-read: %v %v", own, err)
		}
	})
}

// newPassthroughProxy is a test proxy with --passthrough (and cidrs as
// --passthrough-cidrs), its metrics in a registry of their own.
func newPassthroughProxy(tb testing.TB, cidrs ...string) (*testProxy, *prometheus.Registry) {
	tb.Helper()
	up := startUpstream(tb)
	routes := testRoutes(tb, up)
	reg := prometheus.NewRegistry()
	p, err := newWithLookup(Config{DialTimeout: 2 * time.Second, Passthrough: true, PassthroughCIDRs: cidrs, Registerer: reg}, routes)
	if err != nil {
		tb.Fatal(err)
	}
	p.dialControl = loopbackOnly
	tp := &testProxy{Proxy: p, up: up, routes: routes}
	tp.startHTTP(tb)
	return tp, reg
}

// socksConnect is a no-auth greeting and a CONNECT to host (an IP literal,
// sent as an address, or a name) and port.
// An IPv4-mapped literal goes as an IPv6 address.
func socksConnect(host string, port uint16) []byte {
	if a, err := netip.ParseAddr(host); err == nil && a.Is4In6() {
		return slices.Concat([]byte{5, 1, 0, 5, cmdConnect, 0, atypIPv6}, a.AsSlice(), []byte{byte(port >> 8), byte(port)})
	}
	return slices.Concat([]byte{5, 1, 0}, encodeSOCKSRequest(socksRequest{cmd: cmdConnect, host: host, port: port}))
}

// ownAddress returns one of the host's non-loopback, non-link-local
// addresses, if it has one.
func ownAddress(t *testing.T) (netip.Addr, bool) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for a := range toAddrSet(addrs) {
		if !a.IsLoopback() && !a.IsLinkLocalUnicast() && a.Is4() {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// TestPassthroughNeverReachesTheProxyHost asks for live listeners on the
// proxy host through every form of both protocols: each request must be
// refused with SOCKS5 reply 2 (not allowed by ruleset) or HTTP 403, be
// counted with its reason, and leave the listener untouched; routed
// targets on loopback still reach their backend.
func TestPassthroughNeverReachesTheProxyHost(t *testing.T) {
	tp, reg := newPassthroughProxy(t)
	local := startUpstream(t)
	port := local.addr.Port()
	type target struct {
		name, host string
		port       uint16
		reason     string
		listener   *upstream
	}
	targets := []target{
		{"127.0.0.1", "127.0.0.1", port, reasonLoopback, local},
		{"localhost by name", "localhost", port, reasonLoopback, local},
		{"IPv4-mapped 127.0.0.1", "::ffff:127.0.0.1", port, reasonLoopback, local},
		{"0.0.0.0, which Linux takes for 127.0.0.1", "0.0.0.0", port, reasonUnspecified, local},
		{"169.254.1.1", "169.254.1.1", 80, reasonLinkLocal, nil},
	}
	if ln, err := net.Listen("tcp", "[::1]:0"); err == nil {
		ln.Close()
		l6 := startUpstreamOn(t, "[::1]:0")
		targets = append(targets, target{"::1", "::1", l6.addr.Port(), reasonLoopback, l6})
	} else {
		t.Logf("no IPv6 loopback here (%v): the ::1 case is left out", err)
	}
	if own, ok := ownAddress(t); ok {
		lo := startUpstreamOn(t, netip.AddrPortFrom(own, 0).String())
		targets = append(targets, target{"the host's own address " + own.String(), own.String(), lo.addr.Port(), reasonOwnAddress, lo})
	} else {
		t.Log("this host has no non-loopback address: the own-address case is left out")
	}
	refused := map[string]int{}
	for _, tg := range targets {
		hostport := net.JoinHostPort(tg.host, fmt.Sprint(tg.port))
		run := runSOCKS(t, tp, socksConnect(tg.host, tg.port))
		if want := slices.Concat([]byte{5, 0}, socksReply(repNotAllowed)); string(run.out) != string(want) || run.err != nil {
			t.Errorf("socks5 to %s: got %x (%v), want %x: not allowed by ruleset", tg.name, run.out, run.err, want)
		}
		for _, in := range []string{
			fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport),
			fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport),
		} {
			run := runHTTP(t, tp, []byte(in))
			if run.resp == nil || run.resp.StatusCode != http.StatusForbidden || !strings.Contains(run.body, ErrForbidden.Error()) {
				t.Errorf("%q to %s: want 403 saying %q, got %q", strings.Fields(in)[0], tg.name, ErrForbidden, run.raw)
			}
		}
		refused[tg.reason] += 3
		if tg.listener != nil {
			if n := tg.listener.contacts.Load(); n != 0 {
				t.Errorf("%s: the listener got %d connections through the proxy, want 0", tg.name, n)
			}
		}
	}
	for _, reason := range passthroughReasons {
		if got := testutil.MetricValue(t, reg, "tether_proxy_passthrough_refused_total", "reason", reason); got != float64(refused[reason]) {
			t.Errorf("tether_proxy_passthrough_refused_total{reason=%q} = %v, want %d", reason, got, refused[reason])
		}
	}
	if got := testutil.MetricValue(t, reg, "tether_proxy_requests_total", "protocol", "socks5", "result", "passthrough_forbidden"); got != float64(len(targets)) {
		t.Errorf("socks5 requests counted passthrough_forbidden: %v, want %d", got, len(targets))
	}

	// A target with a route is no passthrough: loopback or not, it goes to
	// its backend as before.
	run := runSOCKS(t, tp, socksConnect(routedTarget.Addr().String(), routedTarget.Port()))
	if !strings.HasSuffix(string(run.out), upstreamGreeting) || run.contacts != 1 {
		t.Errorf("a routed loopback target with --passthrough: got %q, %d backend connections", run.out, run.contacts)
	}
}

// TestPassthroughReachesARangeNamedInPassthroughCIDRs opens 127.77.0.0/16:
// a listener there is reached by every form, while 127.0.0.1 stays closed.
func TestPassthroughReachesARangeNamedInPassthroughCIDRs(t *testing.T) {
	tp, reg := newPassthroughProxy(t, "127.77.0.0/16")
	named := startUpstreamOn(t, "127.77.0.50:0")
	hostport := named.addr.String()
	run := runSOCKS(t, tp, socksConnect(named.addr.Addr().String(), named.addr.Port()))
	if want := slices.Concat([]byte{5, 0}, socksReply(repSuccess), []byte(upstreamGreeting)); string(run.out) != string(want) {
		t.Errorf("socks5 to %s: got %q, want %q", hostport, run.out, want)
	}
	for _, in := range []string{
		fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport),
		fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport),
	} {
		run := runHTTP(t, tp, []byte(in))
		if run.resp == nil || run.resp.StatusCode != http.StatusOK || !strings.HasSuffix(run.body, "upstream\n") {
			t.Errorf("%q to %s: want 200 and the listener's bytes, got %q", strings.Fields(in)[0], hostport, run.raw)
		}
	}
	if n := named.contacts.Load(); n != 3 {
		t.Errorf("the listener in the named range got %d connections, want 3", n)
	}

	local := startUpstream(t)
	run = runSOCKS(t, tp, socksConnect("127.0.0.1", local.addr.Port()))
	if want := slices.Concat([]byte{5, 0}, socksReply(repNotAllowed)); string(run.out) != string(want) {
		t.Errorf("socks5 to 127.0.0.1, outside the named range: got %x, want %x", run.out, want)
	}
	if n := local.contacts.Load(); n != 0 {
		t.Errorf("127.0.0.1 got %d connections, want 0", n)
	}
	if got := testutil.MetricValue(t, reg, "tether_proxy_passthrough_refused_total", "reason", reasonLoopback); got != 1 {
		t.Errorf("loopback refusals counted: %v, want 1", got)
	}
}

// TestPassthroughDoesNotReachTheRegistry is the attack against a
// real stack: with --passthrough, "SOCKS CONNECT 127.0.0.1:<redis>" and
// "PING" used to answer +PONG.
func TestPassthroughDoesNotReachTheRegistry(t *testing.T) {
	s := newStack(t, func(c *Config) { c.Passthrough = true })
	redisPort := netip.MustParseAddrPort(s.redis).Port()
	c, err := net.Dial("tcp", s.socks)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(slices.Concat(socksConnect("127.0.0.1", redisPort), []byte("PING\r\n"))); err != nil {
		t.Fatal(err)
	}
	out, err := readUntilClosed(c, 5*time.Second)
	if want := slices.Concat([]byte{5, 0}, socksReply(repNotAllowed)); string(out) != string(want) || err != nil {
		t.Errorf("socks5 CONNECT to the registry: got %q (%v), want %x and a close", out, err, want)
	}
	if out, err := curl(t, "-p", "-x", "http://"+s.http, "http://"+s.redis+"/"); err == nil || !strings.Contains(out, "403") {
		t.Errorf("http CONNECT to the registry: want 403, got %q", out)
	}
	// Routed targets, on loopback too, are unaffected.
	if out, err := curl(t, "--socks5-hostname", s.socks, fmt.Sprintf("http://localhost:%d/", s.localPort)); err != nil || out != "agent-a1" {
		t.Errorf("a routed localhost target with --passthrough: %v %q", err, out)
	}
	if out, err := curl(t, "-x", "http://"+s.http, "http://"+target+"/"); err != nil || out != "agent-a1" {
		t.Errorf("a routed target with --passthrough: %v %q", err, out)
	}
}

package ps

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/internal/testutil"
)

// The sk_lookup plane's tests attach to the network namespace TestMain
// made for this test binary (main_test.go), never to the machine's. Any
// 127.x.y.z address answers on its loopback without an alias.

// echoAt is a handler that writes back the pair it was told, then closes.
func echoAt(at netip.AddrPort, c net.Conn, _ connLoad) {
	defer c.Close()
	_, _ = io.WriteString(c, at.String()+"\n")
}

func newTestSKPlane(t *testing.T, addrs []netip.Addr, capacity int, saveSYN bool, h connHandler) *skLookupPlane {
	t.Helper()
	p, err := newSKLookupPlane(addrs, capacity, h, slog.New(slog.DiscardHandler), saveSYN)
	if err != nil {
		t.Fatalf("newSKLookupPlane: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// askAt dials at and returns the line the handler wrote back.
func askAt(at netip.AddrPort) (string, error) {
	c, err := net.DialTimeout("tcp", at.String(), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func requireDelivered(t *testing.T, at netip.AddrPort) {
	t.Helper()
	got, err := askAt(at)
	if err != nil {
		t.Fatalf("%s: %v", at, err)
	}
	if got != at.String() {
		t.Fatalf("dialed %s, the handler was told %q", at, got)
	}
}

func requireRefused(t *testing.T, at netip.AddrPort) {
	t.Helper()
	got, err := askAt(at)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("%s: want connection refused, got %q, %v", at, got, err)
	}
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// rssBytes is this process's resident set size.
func rssBytes(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmRSS %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestSKLookupManyPairs(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	addrs := []netip.Addr{addr("127.78.0.1"), addr("127.78.0.2")}
	fdsBefore := fdCount(t)
	p := newTestSKPlane(t, addrs, 20000, false, echoAt)

	var open []netip.AddrPort
	start := time.Now()
	for _, a := range addrs {
		for port := 20000; port < 30000; port++ {
			at := netip.AddrPortFrom(a, uint16(port))
			if err := p.Open(at); err != nil {
				t.Fatalf("open %s: %v", at, err)
			}
			open = append(open, at)
		}
	}
	took := time.Since(start)
	if n := p.openPairs(); n != 20000 {
		t.Fatalf("openPairs = %d, want 20000", n)
	}
	fdsAfter := fdCount(t)
	t.Logf("FIGURE sk_lookup: 20000 pairs opened in %v; fds %d -> %d", took.Round(time.Millisecond), fdsBefore, fdsAfter)
	if fdsAfter-fdsBefore >= 50 {
		t.Fatalf("fds grew from %d to %d for 20000 pairs: the plane must not hold a socket per pair", fdsBefore, fdsAfter)
	}

	rng := rand.New(rand.NewPCG(1, 2))
	for range 300 {
		requireDelivered(t, open[rng.IntN(len(open))])
	}
	steered, failed, err := p.counters()
	if err != nil {
		t.Fatal(err)
	}
	if steered < 300 || failed != 0 {
		t.Fatalf("counters: steered %d (want >= 300), assign failed %d (want 0)", steered, failed)
	}

	// Never opened: another port, another address, another protocol's
	// worth of nothing: the normal lookup refuses them.
	requireRefused(t, netip.MustParseAddrPort("127.78.0.1:30000"))
	requireRefused(t, netip.MustParseAddrPort("127.78.0.3:20000"))
	requireRefused(t, netip.MustParseAddrPort("127.78.0.2:19999"))

	released := netip.MustParseAddrPort("127.78.0.2:25000")
	p.Release(released)
	requireRefused(t, released)
	requireDelivered(t, netip.MustParseAddrPort("127.78.0.2:25001"))
	requireDelivered(t, netip.MustParseAddrPort("127.78.0.1:25000"))
	if err := p.Open(released); err != nil {
		t.Fatalf("re-open %s: %v", released, err)
	}
	requireDelivered(t, released)
	if err := p.Open(released); err == nil || !strings.Contains(err.Error(), "already open") {
		t.Fatalf("opening an open pair again: got %v, want an 'already open' error", err)
	}
}

func TestSKLookupScaleFigure(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	const pairs = 50000
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	rss0, fds0 := rssBytes(t), fdCount(t)
	p := newTestSKPlane(t, []netip.Addr{addr("127.78.1.1")}, pairs, false, echoAt)
	start := time.Now()
	for port := 10000; port < 10000+pairs; port++ {
		if err := p.Open(netip.AddrPortFrom(addr("127.78.1.1"), uint16(port))); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	runtime.GC()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	rss1, fds1 := rssBytes(t), fdCount(t)
	t.Logf("FIGURE sk_lookup: %d pairs opened in %v (%v per Open); RSS %+.1f MB; Go heap %+.1f MB (%d B per pair); fds %d -> %d",
		pairs, took.Round(time.Millisecond), (took / pairs).Round(time.Nanosecond),
		float64(rss1-rss0)/(1<<20), float64(int64(ms1.HeapAlloc)-int64(ms0.HeapAlloc))/(1<<20),
		(int64(ms1.HeapAlloc)-int64(ms0.HeapAlloc))/pairs, fds0, fds1)
	t.Logf("FIGURE sk_lookup: steering map of %d pairs: %s kernel memory (memlock)", pairs, mapMemlock(t, p.objs.TetherPairs))
	requireDelivered(t, netip.AddrPortFrom(addr("127.78.1.1"), 10000+pairs-1))
	if fds1-fds0 >= 50 {
		t.Fatalf("fds grew from %d to %d", fds0, fds1)
	}
}

// mapMemlock is the kernel memory charged to m, as its fdinfo says.
func mapMemlock(t *testing.T, m *ebpf.Map) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", m.FD()))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "memlock:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err == nil {
				return fmt.Sprintf("%.1f MB", float64(n)/(1<<20))
			}
		}
	}
	return "unknown"
}

// heldConn is a connection a handler holds until told to let go.
type heldConn struct {
	at   netip.AddrPort
	load connLoad
}

func TestSKLookupLoadCounting(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	release := make(chan struct{})
	held := make(chan heldConn, 16)
	// returned hears of each handler's return: the plane does not wait
	// for handlers, the test must.
	returned := make(chan struct{}, 16)
	awaitReturns := func(n int) {
		t.Helper()
		for range n {
			select {
			case <-returned:
			case <-time.After(5 * time.Second):
				t.Fatal("a handler did not return")
			}
		}
	}
	p := newTestSKPlane(t, []netip.Addr{addr("127.78.3.1")}, 16, false, func(at netip.AddrPort, c net.Conn, load connLoad) {
		defer func() { returned <- struct{}{} }()
		defer c.Close()
		held <- heldConn{at, load}
		<-release
	})
	a, b := netip.MustParseAddrPort("127.78.3.1:21000"), netip.MustParseAddrPort("127.78.3.1:21001")
	for _, at := range []netip.AddrPort{a, b} {
		if err := p.Open(at); err != nil {
			t.Fatal(err)
		}
	}
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			_ = c.Close()
		}
	}()
	dial := func(at netip.AddrPort) heldConn {
		t.Helper()
		c, err := net.DialTimeout("tcp", at.String(), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		select {
		case h := <-held:
			return h
		case <-time.After(5 * time.Second):
			t.Fatalf("no handler call for %s", at)
			return heldConn{}
		}
	}
	want := func(h heldConn, at netip.AddrPort, pair, total int64) {
		t.Helper()
		if h.at != at || h.load != (connLoad{pair: pair, total: total}) {
			t.Fatalf("got %s %+v, want %s {pair:%d total:%d}", h.at, h.load, at, pair, total)
		}
	}
	want(dial(a), a, 1, 1)
	want(dial(a), a, 2, 2)
	want(dial(b), b, 1, 3)
	// A count belongs to one Open: the two connections still held on a
	// do not count against whoever a serves next.
	p.Release(a)
	if err := p.Open(a); err != nil {
		t.Fatal(err)
	}
	want(dial(a), a, 1, 4)

	close(release)
	awaitReturns(4)
	testutil.Eventually(t, 5*time.Second, "the total count returns to 0 when the handlers return", func() error {
		if n := p.active.Load(); n != 0 {
			return fmt.Errorf("%d connections still counted", n)
		}
		return nil
	})
	// release stays closed: this handler returns at once.
	want(dial(b), b, 1, 1)
	awaitReturns(1)
}

// sklookupLinksIn lists the sk_lookup links attached to the network
// namespace whose inode is ino.
func sklookupLinksIn(t *testing.T, ino uint64) []link.ID {
	t.Helper()
	var ids []link.ID
	it := new(link.Iterator)
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue // gone meanwhile
		}
		ns := info.NetNs()
		if info.Type == link.NetNsType && ns != nil && uint64(ns.NetnsInode) == ino && uint32(ns.AttachType) == uint32(ebpf.AttachSkLookup) {
			ids = append(ids, info.ID)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterate links: %v", err)
	}
	return ids
}

func netnsIno(t *testing.T) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestSKLookupCloseLeavesNoSteering(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	ino := netnsIno(t)
	before := len(sklookupLinksIn(t, ino))
	addrs := []netip.Addr{addr("127.78.4.1")}
	p, err := newSKLookupPlane(addrs, 64, echoAt, slog.New(slog.DiscardHandler), false)
	if err != nil {
		t.Fatal(err)
	}
	var pairs []netip.AddrPort
	for port := 22000; port < 22010; port++ {
		at := netip.AddrPortFrom(addrs[0], uint16(port))
		if err := p.Open(at); err != nil {
			t.Fatal(err)
		}
		pairs = append(pairs, at)
	}
	requireDelivered(t, pairs[3])
	if n := len(sklookupLinksIn(t, ino)); n != before+1 {
		t.Fatalf("%d sk_lookup links in this namespace while the plane runs, want %d", n, before+1)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, at := range pairs {
		requireRefused(t, at)
	}
	if n := len(sklookupLinksIn(t, ino)); n != before {
		t.Fatalf("%d sk_lookup links in this namespace after Close, want %d", n, before)
	}
	if err := p.Open(pairs[0]); !errors.Is(err, errPlaneClosed) {
		t.Fatalf("Open after Close: %v, want errPlaneClosed", err)
	}

	// A new plane in the same namespace starts from nothing.
	q := newTestSKPlane(t, addrs, 64, false, echoAt)
	requireRefused(t, pairs[0])
	if err := q.Open(pairs[0]); err != nil {
		t.Fatal(err)
	}
	requireDelivered(t, pairs[0])
	requireRefused(t, pairs[1])
}

func TestSKLookupReleasedBeforeAcceptIsReset(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	delivered := make(chan netip.AddrPort, 1)
	p := newTestSKPlane(t, []netip.Addr{addr("127.78.5.1")}, 8, false, func(at netip.AddrPort, c net.Conn, _ connLoad) {
		delivered <- at
		echoAt(at, c, connLoad{})
	})
	at := netip.MustParseAddrPort("127.78.5.1:23000")
	if err := p.Open(at); err != nil {
		t.Fatal(err)
	}
	// Hold the accept loop between accept and claim until the pair is
	// released: the connection was steered (the handshake completed
	// while the pair was open) but is claimed after the Release.
	accepted, proceed := make(chan struct{}), make(chan struct{})
	hook := func(netip.AddrPort) {
		accepted <- struct{}{}
		<-proceed
	}
	p.claimHook.Store(&hook)
	c, err := net.DialTimeout("tcp", at.String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-accepted
	p.Release(at)
	p.claimHook.Store(nil)
	close(proceed)

	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := c.Read(make([]byte, 64))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read from a connection whose pair was released before accept: %d bytes, %v; want connection reset", n, err)
	}
	select {
	case got := <-delivered:
		t.Fatalf("the connection was delivered to the handler as %s", got)
	default:
	}
	if got := p.unclaimedResets(); got != 1 {
		t.Fatalf("unclaimedResets = %d, want 1", got)
	}
	requireRefused(t, at)
}

func TestSKLookupIPv6(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	v4, v6 := addr("127.78.6.1"), addr("::1")
	p := newTestSKPlane(t, []netip.Addr{v4, v6}, 8, false, echoAt)
	a4, a6 := netip.AddrPortFrom(v4, 24000), netip.AddrPortFrom(v6, 24000)
	for _, at := range []netip.AddrPort{a4, a6} {
		if err := p.Open(at); err != nil {
			t.Fatal(err)
		}
	}
	requireDelivered(t, a6)
	requireDelivered(t, a4)
	p.Release(a6)
	requireRefused(t, a6)
	requireDelivered(t, a4)

	// A plane built for IPv4 only has no socket an IPv6 pair could go to.
	only4 := newTestSKPlane(t, []netip.Addr{addr("127.78.6.2")}, 8, false, echoAt)
	if err := only4.Open(netip.AddrPortFrom(v6, 24001)); err == nil || !strings.Contains(err.Error(), "no listener of that address family") {
		t.Fatalf("IPv6 pair on an IPv4-only plane: got %v, want a 'no listener of that address family' error", err)
	}
	// v4-mapped is the IPv4 pair.
	if err := only4.Open(netip.MustParseAddrPort("[::ffff:127.78.6.2]:24002")); err != nil {
		t.Fatal(err)
	}
	requireDelivered(t, netip.MustParseAddrPort("127.78.6.2:24002"))
}

func TestSKLookupSavesIntentSYN(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	// The handler answers with the destination port of the SYN the
	// kernel saved for the connection, or why it could not.
	synPort := func(at netip.AddrPort, c net.Conn, _ connLoad) {
		defer c.Close()
		syn, err := SavedSYN(c)
		if err == nil && len(syn) == 0 {
			err = errors.New("no SYN saved")
		}
		var tcp []byte
		if err == nil {
			tcp, err = tcpHeader(syn)
		}
		if err == nil && len(tcp) < 4 {
			err = errTruncated
		}
		if err != nil {
			_, _ = fmt.Fprintf(c, "error: %v\n", err)
			return
		}
		_, _ = fmt.Fprintf(c, "%d\n", uint16(tcp[2])<<8|uint16(tcp[3]))
	}
	for _, saveSYN := range []bool{true, false} {
		t.Run(fmt.Sprintf("saveSYN=%v", saveSYN), func(t *testing.T) {
			p := newTestSKPlane(t, []netip.Addr{addr("127.78.7.1"), addr("::1")}, 8, saveSYN, synPort)
			for _, at := range []netip.AddrPort{netip.MustParseAddrPort("127.78.7.1:25000"), netip.MustParseAddrPort("[::1]:25001")} {
				if err := p.Open(at); err != nil {
					t.Fatal(err)
				}
				got, err := askAt(at)
				if err != nil {
					t.Fatal(err)
				}
				want := strconv.Itoa(int(at.Port()))
				if !saveSYN {
					want = "error: no SYN saved"
				}
				if got != want {
					t.Fatalf("%s: handler says %q, want %q", at, got, want)
				}
			}
		})
	}
}

func TestSKLookupCapacity(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	p := newTestSKPlane(t, []netip.Addr{addr("127.78.8.1")}, 10, false, echoAt)
	var pairs []netip.AddrPort
	for port := 26000; port < 26010; port++ {
		at := netip.AddrPortFrom(addr("127.78.8.1"), uint16(port))
		if err := p.Open(at); err != nil {
			t.Fatal(err)
		}
		pairs = append(pairs, at)
	}
	extra := netip.MustParseAddrPort("127.78.8.1:26010")
	err := p.Open(extra)
	if err == nil || !strings.Contains(err.Error(), "steering map full: 10 pairs") {
		t.Fatalf("Open beyond capacity: got %v, want 'steering map full: 10 pairs'", err)
	}
	requireRefused(t, extra)
	for _, at := range pairs {
		requireDelivered(t, at)
	}
	if n := p.openPairs(); n != 10 {
		t.Fatalf("openPairs = %d after a failed Open, want 10", n)
	}
	p.Release(pairs[0])
	if err := p.Open(extra); err != nil {
		t.Fatalf("Open after a Release made room: %v", err)
	}
	requireDelivered(t, extra)
}

// TestSKLookupConnectRateFigure prints the sequential connect, request,
// close rate through the plane and through a plain listener.
func TestSKLookupConnectRateFigure(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	const rounds = 2000
	p := newTestSKPlane(t, []netip.Addr{addr("127.78.9.1")}, 8, false, echoAt)
	steered := netip.MustParseAddrPort("127.78.9.1:27000")
	if err := p.Open(steered); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.78.9.2:27000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	plain := netip.MustParseAddrPort(ln.Addr().String())
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go echoAt(plain, c, connLoad{})
		}
	}()
	rate := func(at netip.AddrPort) float64 {
		start := time.Now()
		for range rounds {
			requireDelivered(t, at)
		}
		return rounds / time.Since(start).Seconds()
	}
	// Interleaved halves, so that a slow moment of the machine does not
	// land on one side only.
	s1, l1 := rate(steered), rate(plain)
	s2, l2 := rate(steered), rate(plain)
	t.Logf("FIGURE connect+request+close, sequential, one client: sk_lookup %.0f/s, plain listener %.0f/s", (s1+s2)/2, (l1+l2)/2)
}

// TestSteerKeyLayout pins the key the program looks up: the address as 16
// bytes in network order (IPv4 v4-mapped), the port in host order.
func TestSteerKeyLayout(t *testing.T) {
	k := steerKey(netip.MustParseAddrPort("127.78.0.1:20000"))
	var b [16]byte
	for i, w := range k.Addr {
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(w), byte(w>>8), byte(w>>16), byte(w>>24)
	}
	if netip.AddrFrom16(b) != netip.MustParseAddr("::ffff:127.78.0.1") || k.Port != 20000 {
		t.Fatalf("key %+v: bytes %v port %d, want ::ffff:127.78.0.1 and 20000", k, b, k.Port)
	}
	if steerKey(netip.MustParseAddrPort("[::1]:1")).Addr != [4]uint32{0, 0, 0, 1 << 24} {
		t.Fatal("::1 must be 0,0,0,1 in network order")
	}
}

func TestSKLookupErrorHints(t *testing.T) {
	err := bpfError("load the steering program and maps", fmt.Errorf("map create: %w (MEMLOCK may be too low)", unix.EPERM))
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "needs CAP_BPF and CAP_NET_ADMIN") || strings.Contains(err.Error(), "MEMLOCK") {
		t.Fatalf("EPERM: %v", err)
	}
	err = bpfError("attach", unix.EINVAL)
	if strings.Contains(err.Error(), "CAP_BPF") {
		t.Fatalf("EINVAL got the capability hint: %v", err)
	}
	if _, err := newSKLookupPlane([]netip.Addr{addr("127.0.0.1")}, 0, echoAt, slog.New(slog.DiscardHandler), false); err == nil {
		t.Fatal("capacity 0 accepted")
	}
}

// Two PS processes may share a network namespace (several PS on one host,
// or an old and a new instance during a restart): each program steers only
// its own pairs, and a program that finds no pair of its own leaves the
// other's choice alone, whichever was attached first. Closing one leaves
// the other's pairs served.
func TestSKLookupTwoPlanesShareANamespace(t *testing.T) {
	testutil.RequirePrivateNetns(t)
	tagged := func(tag string) connHandler {
		return func(at netip.AddrPort, c net.Conn, _ connLoad) {
			defer c.Close()
			_, _ = io.WriteString(c, tag+" "+at.String()+"\n")
		}
	}
	first := newTestSKPlane(t, []netip.Addr{addr("127.78.1.1")}, 16, false, tagged("first"))
	second := newTestSKPlane(t, []netip.Addr{addr("127.78.1.1")}, 16, false, tagged("second"))
	a := netip.MustParseAddrPort("127.78.1.1:21000")
	b := netip.MustParseAddrPort("127.78.1.1:21001")
	if err := first.Open(a); err != nil {
		t.Fatal(err)
	}
	if err := second.Open(b); err != nil {
		t.Fatal(err)
	}
	ask := func(at netip.AddrPort, want string) {
		t.Helper()
		got, err := askAt(at)
		if err != nil || got != want+" "+at.String() {
			t.Fatalf("%s: got %q, %v; want %q", at, got, err, want+" "+at.String())
		}
	}
	for range 20 {
		ask(a, "first")
		ask(b, "second")
	}
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	ask(a, "first")
	requireRefused(t, b)
}

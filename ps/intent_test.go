package ps

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"

	"github.com/tether-net/tether/internal/testutil"
)

// synWith builds an IPv4 (or IPv6) header and a TCP SYN header carrying opts.
func synWith(v6 bool, opts []byte) []byte {
	for len(opts)%4 != 0 {
		opts = append(opts, 0)
	}
	var ip []byte
	if v6 {
		ip = make([]byte, 40)
		ip[0] = 6 << 4
		ip[6] = 6
	} else {
		ip = make([]byte, 20)
		ip[0] = 4<<4 | 5
		ip[9] = 6
	}
	tcp := make([]byte, 20, 20+len(opts))
	tcp[12] = byte((20+len(opts))/4) << 4
	tcp[13] = 0x02
	return append(append(ip, tcp...), opts...)
}

func intentOpt(target netip.AddrPort) []byte {
	o := []byte{IntentOptionKind, IntentOptionLen, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(o[2:], IntentExID)
	a := target.Addr().As4()
	copy(o[4:], a[:])
	binary.BigEndian.PutUint16(o[8:], target.Port())
	return o
}

// Linux's own SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
var kernelOpts = []byte{2, 4, 0xff, 0xd7, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7}

func TestParseIntent(t *testing.T) {
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	otherExID := intentOpt(target)
	otherExID[3] = 0x01
	cases := []struct {
		name    string
		syn     []byte
		want    netip.AddrPort
		found   bool
		wantErr bool
	}{
		{"after the kernel's options, behind 2 NOPs", synWith(false, append(append(append([]byte{}, kernelOpts...), 1, 1), intentOpt(target)...)), target, true, false},
		{"IPv6 header", synWith(true, intentOpt(target)), target, true, false},
		{"IPv4 header with options", func() []byte {
			s := synWith(false, intentOpt(target))
			s[0] = 4<<4 | 6
			return append(s[:20:20], append([]byte{1, 1, 1, 0}, s[20:]...)...)
		}(), target, true, false},
		{"no intent", synWith(false, kernelOpts), netip.AddrPort{}, false, false},
		{"another ExID", synWith(false, otherExID), netip.AddrPort{}, false, false},
		{"after end of options", synWith(false, append([]byte{1, 0}, intentOpt(target)...)), netip.AddrPort{}, false, false},
		{"empty (SYN cookies)", nil, netip.AddrPort{}, false, true},
		{"zero option length", synWith(false, []byte{8, 0, 1, 1}), netip.AddrPort{}, false, true},
		{"option past the header", synWith(false, []byte{1, 1, 1, 254}), netip.AddrPort{}, false, true},
		{"UDP", func() []byte { s := synWith(false, nil); s[9] = 17; return s }(), netip.AddrPort{}, false, true},
		{"data offset past the end", synWith(false, intentOpt(target))[:32], netip.AddrPort{}, false, true},
		{"IPv6 extension header", func() []byte { s := synWith(true, nil); s[6] = 0; return s }(), netip.AddrPort{}, false, true},
	}
	for _, c := range cases {
		got, found, err := ParseIntent(c.syn)
		if got != c.want || found != c.found || (err != nil) != c.wantErr {
			t.Errorf("%s: got %v %v %v, want %v %v err=%v", c.name, got, found, err, c.want, c.found, c.wantErr)
		}
	}
}

func FuzzParseIntent(f *testing.F) {
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	f.Add(synWith(false, append(append([]byte{}, kernelOpts...), intentOpt(target)...)))
	f.Add(synWith(true, intentOpt(target)))
	f.Add(synWith(false, kernelOpts))
	f.Add([]byte{0x4f})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, syn []byte) {
		got, found, err := ParseIntent(syn)
		if err != nil && found {
			t.Fatalf("found an intent and an error: %v", err)
		}
		if found && !got.Addr().Is4() {
			t.Fatalf("intent %v is not IPv4", got)
		}
		if found && !bytes.Contains(syn, intentOpt(got)) {
			t.Fatalf("intent %v is not in the input", got)
		}
	})
}

func TestIntentModeValidation(t *testing.T) {
	for _, m := range []string{"", "off", "verify", "require"} {
		if err := validIntentMode(m); err != nil {
			t.Errorf("%q: %v", m, err)
		}
	}
	if err := validIntentMode("on"); err == nil || !strings.Contains(err.Error(), "--intent") {
		t.Errorf("--intent on: got %v, want an error naming the flag", err)
	}
	if DefaultConfig().Intent != IntentVerify {
		t.Errorf("default --intent is %q, want verify", DefaultConfig().Intent)
	}
}

// intentPS is the least of a PS that intentAllows needs.
func intentPS(t *testing.T, mode string) (*PS, *prometheus.Registry) {
	reg := prometheus.NewRegistry()
	m, err := newPSMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	return &PS{cfg: Config{Intent: mode}, log: slog.New(slog.DiscardHandler), m: m}, reg
}

// acceptPair listens with SaveSYN on 127.0.0.1, dials it, and returns the
// accepted side.
func acceptPair(t *testing.T) net.Conn {
	t.Helper()
	lc := net.ListenConfig{Control: SaveSYN}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(3 * time.Second))
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// A client without the redirector sends a SYN without intent: verify
// delivers it, require refuses it, off does not look.
func TestIntentAbsentOnAPlainConnection(t *testing.T) {
	want := netip.MustParseAddrPort("127.77.0.1:9100")
	client := netip.MustParseAddrPort("127.0.0.1:1")
	for _, c := range []struct {
		mode    string
		deliver bool
		result  string
	}{{"verify", true, "absent"}, {"", true, "absent"}, {"require", false, "refused_absent"}, {"off", true, ""}} {
		p, reg := intentPS(t, c.mode)
		if got := p.intentAllows(netip.MustParseAddrPort("127.0.0.1:1"), acceptPair(t), want, client); got != c.deliver {
			t.Errorf("--intent %q: delivered %v, want %v", c.mode, got, c.deliver)
		}
		for _, r := range []string{"match", "mismatch", "absent", "refused_absent"} {
			wantN := 0.0
			if r == c.result {
				wantN = 1
			}
			if n := testutil.MetricValue(t, reg, "tether_ps_intent_total", "result", r); n != wantN {
				t.Errorf("--intent %q: tether_ps_intent_total{result=%s} = %v, want %v", c.mode, r, n, wantN)
			}
		}
	}
}

func TestSavedSYNIsTheIPv4SYN(t *testing.T) {
	syn, err := SavedSYN(acceptPair(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, found, err := ParseIntent(syn); err != nil || found {
		t.Fatalf("saved SYN %x: found=%v err=%v, want a well-formed SYN without intent", syn, found, err)
	}
	if len(syn) < 40 || syn[0]>>4 != 4 || syn[20+13]&0x12 != 0x02 {
		t.Fatalf("saved SYN %x is not an IPv4 SYN", syn)
	}
}

// Under SYN cookies no SYN is saved, so no intent is seen: verify delivers
// the connection as one without intent, require refuses it. The sysctl is
// set in a network namespace of the test's own (a child process under
// unshare -n), never on the host.
func TestSynCookiesLeaveNoIntent(t *testing.T) {
	if os.Getenv("TETHER_TEST_SYNCOOKIES_CHILD") == "1" {
		synCookiesChild(t)
		return
	}
	testutil.RequirePrivileged(t)
	unshare := testutil.RequireBinary(t, "unshare")
	cmd := exec.Command(unshare, "--net", os.Args[0], "-test.run=^TestSynCookiesLeaveNoIntent$", "-test.v")
	parent, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(), "TETHER_TEST_SYNCOOKIES_CHILD=1", "TETHER_TEST_PARENT_NETNS="+parent)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestSynCookiesLeaveNoIntent") {
		t.Fatalf("child in a new network namespace: %v\n%s", err, out)
	}
}

func synCookiesChild(t *testing.T) {
	// A guard against ever writing the host's sysctl: the child must be in
	// another network namespace than the test that started it.
	self, err := os.Readlink("/proc/self/ns/net")
	parent := os.Getenv("TETHER_TEST_PARENT_NETNS")
	if err != nil || parent == "" || self == parent {
		t.Fatalf("not in a network namespace of its own (%s, parent %q: %v): refusing to change sysctls", self, parent, err)
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("bring up lo: %v", err)
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_syncookies", []byte("2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s := acceptPair(t)
	syn, err := SavedSYN(s)
	if err != nil || len(syn) != 0 {
		t.Fatalf("under tcp_syncookies=2: saved SYN %x, err %v; want none", syn, err)
	}
	want := netip.MustParseAddrPort("127.77.0.1:9100")
	p, reg := intentPS(t, "verify")
	if !p.intentAllows(netip.MustParseAddrPort("127.0.0.1:1"), s, want, netip.AddrPort{}) || testutil.MetricValue(t, reg, "tether_ps_intent_total", "result", "absent") != 1 {
		t.Error("verify: a connection made from a SYN cookie was not delivered as absent")
	}
	p, reg = intentPS(t, "require")
	if p.intentAllows(netip.MustParseAddrPort("127.0.0.1:1"), acceptPair(t), want, netip.AddrPort{}) || testutil.MetricValue(t, reg, "tether_ps_intent_total", "result", "refused_absent") != 1 {
		t.Error("require: a connection made from a SYN cookie was not refused")
	}
}

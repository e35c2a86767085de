package ps

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// pairsOn builds pairs of one address, for short test tables.
func pairsOn(a netip.Addr, ports ...uint16) []netip.AddrPort {
	out := make([]netip.AddrPort, len(ports))
	for i, p := range ports {
		out[i] = netip.AddrPortFrom(a, p)
	}
	return out
}

func portsOf(pairs []netip.AddrPort) string {
	var b strings.Builder
	for i, at := range pairs {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(at.String())
	}
	return "[" + b.String() + "]"
}

func TestPortAllocatorSkipsUsedQuarantinedAndUnbindable(t *testing.T) {
	now := time.Unix(1000, 0)
	ip := netip.MustParseAddr("10.0.0.1")
	at := func(p uint16) netip.AddrPort { return netip.AddrPortFrom(ip, p) }
	a := newPortAllocator([]netip.Addr{ip}, PortRange{100, 105}, func() time.Time { return now })
	taken := map[netip.AddrPort]bool{at(102): true} // the OS refuses this one
	bind := func(p netip.AddrPort) error {
		if taken[p] {
			return errors.New("address in use")
		}
		return nil
	}
	want := func(got []netip.AddrPort, ports ...uint16) bool {
		return portsOf(got) == portsOf(pairsOn(ip, ports...))
	}
	got, err := a.allocate(3, bind)
	if err != nil || !want(got, 100, 101, 103) {
		t.Fatalf("allocate: %v, %v; want 100 101 103", got, err)
	}
	a.release(pairsOn(ip, 100), now.Add(time.Minute))
	got, err = a.allocate(3, bind)
	if !errors.Is(err, ErrNoPorts) || !want(got, 104, 105) {
		t.Fatalf("allocate past the range: %v, %v; want 104 105 and ErrNoPorts", got, err)
	}
	// 100 stays quarantined until its time, then comes back; round robin
	// means it is the last one to be reused.
	a.free(pairsOn(ip, 104, 105))
	if got, _ := a.allocate(1, bind); !want(got, 104) {
		t.Fatalf("after free: %v, want 104 (100 is quarantined)", got)
	}
	now = now.Add(2 * time.Minute)
	if got, _ := a.allocate(2, bind); !want(got, 105, 100) {
		t.Fatalf("after the quarantine: %v, want 105 100", got)
	}
	a.quarantineUntil(map[netip.AddrPort]time.Time{at(105): now.Add(time.Hour)})
	a.free(pairsOn(ip, 105))
	if _, q := a.counts(); q != 1 {
		t.Fatalf("quarantined count %d, want 1", q)
	}
	if got, _ := a.allocate(1, bind); len(got) != 0 {
		t.Fatalf("a port quarantined by the registry was handed out: %v", got)
	}
}

// Several addresses: every port is used on each address in turn, the range
// holds addresses x ports pairs, and a pair quarantined on one address
// leaves the same port on another address free.
func TestPortAllocatorSpreadsOverAddresses(t *testing.T) {
	now := time.Unix(1000, 0)
	a1, a2 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	a := newPortAllocator([]netip.Addr{a1, a2}, PortRange{100, 102}, func() time.Time { return now })
	ok := func(netip.AddrPort) error { return nil }
	got, err := a.allocate(6, ok)
	if err != nil || portsOf(got) != "[10.0.0.1:100 10.0.0.2:100 10.0.0.1:101 10.0.0.2:101 10.0.0.1:102 10.0.0.2:102]" {
		t.Fatalf("allocate 6 of 2x3: %v, %v", portsOf(got), err)
	}
	if more, err := a.allocate(1, ok); !errors.Is(err, ErrNoPorts) || len(more) != 0 {
		t.Fatalf("a 7th pair of 2x3: %v, %v", more, err)
	}
	a.release(pairsOn(a1, 101), now.Add(time.Minute))
	a.free(pairsOn(a2, 101))
	got, _ = a.allocate(2, ok)
	if portsOf(got) != "[10.0.0.2:101]" {
		t.Fatalf("with 10.0.0.1:101 quarantined and 10.0.0.2:101 free: %v, want only 10.0.0.2:101", portsOf(got))
	}
	if used, q := a.counts(); used != 5 || q != 1 {
		t.Fatalf("counts %d used %d quarantined, want 5 and 1", used, q)
	}
}

func TestParseAdvertise(t *testing.T) {
	got, err := parseAdvertise([]string{"127.0.0.2", " ::ffff:10.1.2.3", "2001:db8::1"})
	if err != nil || fmt.Sprint(got) != "[127.0.0.2 10.1.2.3 2001:db8::1]" {
		t.Fatalf("parseAdvertise: %v, %v", got, err)
	}
	for _, bad := range [][]string{nil, {""}, {"0.0.0.0"}, {"::"}, {"10.0.0.1", "10.0.0.1"}, {"10.0.0.1", "::ffff:10.0.0.1"}, {"fe80::1%eth0"}, {"host.example"}} {
		if _, err := parseAdvertise(bad); err == nil || !strings.Contains(err.Error(), "--advertise") {
			t.Errorf("parseAdvertise(%q) = %v, want an error naming --advertise", bad, err)
		}
	}
}

func TestParsePortRange(t *testing.T) {
	if r, err := ParsePortRange("20000-29999"); err != nil || r.Size() != 10000 {
		t.Fatalf("%v %v", r, err)
	}
	for _, bad := range []string{"", "20000", "0-10", "30-20", "1-70000", "a-b"} {
		if _, err := ParsePortRange(bad); err == nil {
			t.Errorf("ParsePortRange(%q) accepted", bad)
		}
	}
}

func TestTokenFile(t *testing.T) {
	rules, err := parseTokens(bufio.NewScanner(strings.NewReader("# comment\n\nalpha *\nbeta host-*,b1 10.1.0.0/16,10.2.0.5\n")), "f")
	if err != nil {
		t.Fatal(err)
	}
	a := &authorizer{rules: rules}
	src := netip.MustParseAddr("10.9.9.9")
	cred, err := a.authenticate(nil, "anything", "alpha", src)
	if err != nil || cred.listsAddrs() {
		t.Fatalf("alpha as 'anything': %+v %v", cred, err)
	}
	for _, id := range []string{"host-1", "host-", "b1"} {
		cred, err := a.authenticate(nil, id, "beta", src)
		if err != nil {
			t.Fatalf("beta as %q: %v", id, err)
		}
		if !cred.allows(netip.MustParseAddr("10.1.2.3")) || !cred.allows(netip.MustParseAddr("::ffff:10.2.0.5")) || cred.allows(netip.MustParseAddr("10.2.0.6")) {
			t.Fatalf("beta's CIDRs: %+v", cred)
		}
	}
	if _, err := a.authenticate(nil, "b2", "beta", src); err == nil || !strings.Contains(err.Error(), `may not act as agent "b2"`) {
		t.Fatalf("beta as b2: %v", err)
	}
	for _, wrong := range []string{"", "alph", "alphaa", "beta host-*"} {
		if _, err := a.authenticate(nil, "host-1", wrong, src); err == nil {
			t.Errorf("token %q accepted", wrong)
		}
	}
	alpha, _ := a.authenticate(nil, "x", "alpha", src)
	beta, _ := a.authenticate(nil, "b1", "beta", src)
	if alpha.key == beta.key || !strings.HasPrefix(alpha.key, "tok:") || strings.Contains(alpha.key, "alpha") {
		t.Fatalf("credential keys %q and %q: want distinct keys that do not reveal the token", alpha.key, beta.key)
	}
	for bad, says := range map[string]string{
		"":                    "holds no token",
		"# only a comment\n":  "holds no token",
		"tok\n":               "write 'TOKEN *'",
		"tok 10.0.0.0/8\n":    "write 'TOKEN * 10.0.0.0/8'",
		"tok * 10.0.0.0/99\n": "10.0.0.0/99",
		"tok a b c\n":         "4 fields",
		"tok a{b\n":           "not allowed",
	} {
		if _, err := parseTokens(bufio.NewScanner(strings.NewReader(bad)), "f"); err == nil || !strings.Contains(err.Error(), says) {
			t.Errorf("token file %q: %v, want an error saying %q", bad, err, says)
		}
	}
}

func TestGlobMatch(t *testing.T) {
	for _, c := range []struct {
		pat, id string
		ok      bool
	}{
		{"a1", "a1", true}, {"a1", "a10", false}, {"*", "anything", true}, {"host-*", "host-12", true},
		{"host-*", "hos", false}, {"*-db", "eu-db", true}, {"*-db", "eu-dbx", false}, {"a*b*c", "axxbyyc", true},
		{"a*b*c", "axxbyy", false}, {"host-*", "other-host-1", false},
	} {
		if got := globMatch(c.pat, c.id); got != c.ok {
			t.Errorf("globMatch(%q, %q) = %v, want %v", c.pat, c.id, got, c.ok)
		}
	}
}

func TestQuotas(t *testing.T) {
	q := newQuotas(2, 10)
	if n, err := q.reserve("k", 6, usage{}); err != nil || n != 6 {
		t.Fatalf("first: %d %v", n, err)
	}
	if n, err := q.reserve("k", 6, usage{}); err != nil || n != 4 {
		t.Fatalf("second: %d %v, want the 4 left", n, err)
	}
	if _, err := q.reserve("k", 1, usage{}); err == nil {
		t.Fatal("a third tunnel passed a limit of 2")
	}
	if n, err := q.reserve("other", 10, usage{}); err != nil || n != 10 {
		t.Fatalf("another credential is not affected: %d %v", n, err)
	}
	// Superseding a session gets its share as credit.
	if n, err := q.reserve("k", 8, usage{tunnels: 1, endpoints: 6}); err != nil || n != 6 {
		t.Fatalf("superseding: %d %v", n, err)
	}
	q.release("k", usage{tunnels: 3, endpoints: 16})
	if len(q.used) != 1 {
		t.Fatalf("released credential still counted: %+v", q.used)
	}
}

func TestGateBoundsConcurrencyAndRate(t *testing.T) {
	now := time.Unix(0, 0)
	g := newGate(2, 10, 2, func() time.Time { return now })
	if !g.tryAcquire() || !g.tryAcquire() {
		t.Fatal("the first two handshakes must pass")
	}
	if g.tryAcquire() {
		t.Fatal("a third concurrent handshake passed a limit of 2")
	}
	g.release()
	if g.tryAcquire() {
		t.Fatal("the burst of 2 is spent: no token until time passes")
	}
	now = now.Add(100 * time.Millisecond) // 10/s: one token
	if !g.tryAcquire() {
		t.Fatal("a token should have accrued")
	}
	g.release()
	g.release()
	if g.tryAcquire() {
		t.Fatal("rate exceeded")
	}
}

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

func TestPortAllocatorSkipsUsedQuarantinedAndUnbindable(t *testing.T) {
	now := time.Unix(1000, 0)
	a := newPortAllocator(PortRange{100, 105}, func() time.Time { return now })
	taken := map[uint16]bool{102: true} // the OS refuses this one
	bind := func(p uint16) error {
		if taken[p] {
			return errors.New("address in use")
		}
		return nil
	}
	got, err := a.allocate(3, bind)
	if err != nil || fmt.Sprint(got) != "[100 101 103]" {
		t.Fatalf("allocate: %v, %v; want [100 101 103]", got, err)
	}
	a.release([]uint16{100}, now.Add(time.Minute))
	got, err = a.allocate(3, bind)
	if !errors.Is(err, ErrNoPorts) || fmt.Sprint(got) != "[104 105]" {
		t.Fatalf("allocate past the range: %v, %v; want [104 105] and ErrNoPorts", got, err)
	}
	// 100 stays quarantined until its time, then comes back; round robin
	// means it is the last one to be reused.
	a.free([]uint16{104, 105})
	if got, _ := a.allocate(1, bind); fmt.Sprint(got) != "[104]" {
		t.Fatalf("after free: %v, want [104] (100 is quarantined)", got)
	}
	now = now.Add(2 * time.Minute)
	if got, _ := a.allocate(2, bind); fmt.Sprint(got) != "[105 100]" {
		t.Fatalf("after the quarantine: %v, want [105 100]", got)
	}
	a.quarantineUntil(map[uint16]time.Time{105: now.Add(time.Hour)})
	a.free([]uint16{105})
	if _, q := a.counts(); q != 1 {
		t.Fatalf("quarantined count %d, want 1", q)
	}
	if got, _ := a.allocate(1, bind); len(got) != 0 {
		t.Fatalf("a port quarantined by the registry was handed out: %v", got)
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
	a, err := parseTokens(bufio.NewScanner(strings.NewReader("# comment\n\nalpha\nbeta 10.1.0.0/16,10.2.0.5\n")), "f")
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := a.check("alpha"); !ok || len(r.cidrs) != 0 {
		t.Fatalf("alpha: %+v %v", r, ok)
	}
	r, ok := a.check("beta")
	if !ok || !r.cidrs.Allows(netip.MustParseAddr("10.1.2.3")) || !r.cidrs.Allows(netip.MustParseAddr("10.2.0.5")) ||
		r.cidrs.Allows(netip.MustParseAddr("10.2.0.6")) {
		t.Fatalf("beta's CIDRs: %+v %v", r, ok)
	}
	for _, wrong := range []string{"", "alph", "alphaa", "beta 10.1.0.0/16"} {
		if _, ok := a.check(wrong); ok {
			t.Errorf("token %q accepted", wrong)
		}
	}
	for _, bad := range []string{"", "# only a comment\n", "tok 10.0.0.0/99\n", "tok a b\n"} {
		if _, err := parseTokens(bufio.NewScanner(strings.NewReader(bad)), "f"); err == nil {
			t.Errorf("token file %q accepted", bad)
		}
	}
	if open := (&authorizer{}); !open.open() {
		t.Fatal("no tokens must mean open")
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

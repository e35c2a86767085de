package cidr

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseNormalisesAndNamesTheBadEntry(t *testing.T) {
	l, err := Parse([]string{" 10.1.2.3/8 ", "", "192.0.2.7", "::ffff:198.18.0.0/111", "2001:db8::1", "::ffff:127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	want := "10.0.0.0/8 192.0.2.7/32 198.18.0.0/15 2001:db8::1/128 127.0.0.1/32"
	if got := strings.Join(l.Strings(), " "); got != want {
		t.Fatalf("parsed %q, want %q", got, want)
	}
	for _, bad := range []string{"10.0.0.0/33", "host.example", "fe80::1%eth0", "1.2.3"} {
		if _, err := Parse([]string{"10.0.0.0/8", bad}); err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("Parse(%q): %v, want an error naming it", bad, err)
		}
	}
}

func TestContainsAndAllowsUnmapBothSides(t *testing.T) {
	l, _ := Parse([]string{"::ffff:127.77.0.0/112"})
	for _, ip := range []string{"127.77.1.2", "::ffff:127.77.1.2"} {
		if !l.Contains(netip.MustParseAddr(ip)) {
			t.Errorf("%s not contained in %v", ip, l)
		}
	}
	if l.Contains(netip.MustParseAddr("127.78.0.1")) || l.Allows(netip.MustParseAddr("::ffff:127.78.0.1")) {
		t.Error("an address outside the list was let in")
	}
	var empty List
	if empty.Contains(netip.MustParseAddr("10.0.0.1")) || !empty.Allows(netip.MustParseAddr("10.0.0.1")) {
		t.Error("an empty list contains nothing and allows everything")
	}
}

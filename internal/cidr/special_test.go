package cidr

import (
	"net/netip"
	"testing"
)

func TestSpecialClassifiesTheRangesThatMeanThisHostOrEveryone(t *testing.T) {
	for addr, want := range map[string]string{
		"127.0.0.1":        "loopback",
		"127.77.0.1":       "loopback",
		"::1":              "loopback",
		"::ffff:127.0.0.1": "loopback",
		"169.254.169.254":  "link-local",
		"fe80::1":          "link-local",
		"0.0.0.0":          "unspecified",
		"::":               "unspecified",
		"224.0.0.1":        "multicast",
		"ff02::1":          "multicast",
		"255.255.255.255":  "broadcast",
		"10.1.2.3":         "",
		"198.18.1.11":      "",
		"2001:db8::1":      "",
		"::ffff:10.0.0.1":  "",
	} {
		got, ok := Special(netip.MustParseAddr(addr))
		if got != want || ok != (want != "") {
			t.Errorf("Special(%s) = %q, %v; want %q", addr, got, ok, want)
		}
	}
	if class, ok := Special(netip.Addr{}); !ok || class != "invalid" {
		t.Errorf("the zero Addr must be special (invalid), got %q %v", class, ok)
	}
}

func TestOnlyAPrefixInsideTheSpecialRangeNamesIt(t *testing.T) {
	l, err := Parse([]string{"0.0.0.0/0", "::/0", "127.77.0.0/16", "169.254.169.254", "10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]bool{
		"127.77.0.1":        true,  // inside 127.77.0.0/16, which lies in 127/8
		"::ffff:127.77.0.1": true,  // mapped: the same address
		"127.0.0.1":         false, // only 0.0.0.0/0 contains it: not named
		"::1":               false, // only ::/0 contains it
		"169.254.169.254":   true,
		"169.254.0.1":       false,
		"0.0.0.0":           false, // 0.0.0.0/0 is not inside 0.0.0.0/8
		"10.1.2.3":          false, // not special: nothing to name
	} {
		if got := l.Names(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Names(%s) = %v, want %v", addr, got, want)
		}
	}
	// A prefix wider than the special range does not name it either.
	if (List{netip.MustParsePrefix("126.0.0.0/7")}).Names(netip.MustParseAddr("127.0.0.1")) {
		t.Error("126.0.0.0/7 spans 127/8 and more: it must not name loopback")
	}
	if (List{netip.MustParsePrefix("127.0.0.0/8")}).Names(netip.Addr{}) {
		t.Error("nothing names the zero Addr")
	}
}

func TestPermitsRefusesSpecialAddressesUnlessNamed(t *testing.T) {
	var none List
	for addr, want := range map[string]bool{
		"198.18.1.11": true, "10.0.0.1": true, "2001:db8::1": true,
		"127.0.0.1": false, "::1": false, "169.254.169.254": false, "0.0.0.0": false, "224.0.0.1": false,
	} {
		if got := none.Permits(netip.MustParseAddr(addr)); got != want {
			t.Errorf("empty list: Permits(%s) = %v, want %v", addr, got, want)
		}
	}
	l, _ := Parse([]string{"127.77.0.0/16", "198.18.0.0/15"})
	for addr, want := range map[string]bool{
		"127.77.3.4": true, "198.18.1.11": true,
		"127.0.0.1": false, // loopback outside the named range
		"10.0.0.1":  false, // a list given is the whole allow list
	} {
		if got := l.Permits(netip.MustParseAddr(addr)); got != want {
			t.Errorf("%v: Permits(%s) = %v, want %v", l.Strings(), addr, got, want)
		}
	}
}

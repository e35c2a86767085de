package cidr

import "net/netip"

// The special ranges: addresses that mean "this host", "this link" or
// "everyone" rather than one remote host. Exposing or redirecting them
// reaches the local machine's own services (Redis, metrics, cloud metadata
// at 169.254.169.254), so tether refuses them unless an operator names them
// (see List.Names).
var special = []struct {
	class string
	p     netip.Prefix
}{
	{"loopback", netip.MustParsePrefix("127.0.0.0/8")},
	{"loopback", netip.MustParsePrefix("::1/128")},
	{"link-local", netip.MustParsePrefix("169.254.0.0/16")},
	{"link-local", netip.MustParsePrefix("fe80::/10")},
	// 0.0.0.0/8 is "this network"; a connect() to 0.0.0.0 reaches the
	// local host on Linux, like loopback.
	{"unspecified", netip.MustParsePrefix("0.0.0.0/8")},
	{"unspecified", netip.MustParsePrefix("::/128")},
	{"multicast", netip.MustParsePrefix("224.0.0.0/4")},
	{"multicast", netip.MustParsePrefix("ff00::/8")},
	{"broadcast", netip.MustParsePrefix("255.255.255.255/32")},
}

// specialRange returns the special range holding a (IPv4-mapped addresses
// taken as IPv4) and its class. The zero Addr is "invalid", a special
// class no prefix can name.
func specialRange(a netip.Addr) (netip.Prefix, string, bool) {
	if !a.IsValid() {
		return netip.Prefix{}, "invalid", true
	}
	a = a.Unmap()
	for _, s := range special {
		if s.p.Contains(a) {
			return s.p, s.class, true
		}
	}
	return netip.Prefix{}, "", false
}

// Special reports whether a lies in a special range, and which class:
// "loopback", "link-local", "unspecified", "multicast", "broadcast" (or
// "invalid" for the zero Addr).
func Special(a netip.Addr) (class string, ok bool) {
	_, class, ok = specialRange(a)
	return class, ok
}

// Names reports whether l names a explicitly: some prefix of l that lies
// entirely inside a's special range contains a. A broad prefix such as
// 0.0.0.0/0 contains 127.0.0.1 but does not name it; 127.77.0.0/16 names
// 127.77.0.1. An address outside every special range is named by nothing.
func (l List) Names(a netip.Addr) bool {
	r, _, ok := specialRange(a)
	if !ok || !r.IsValid() {
		return false
	}
	a = a.Unmap()
	for _, p := range l {
		if p.Bits() >= r.Bits() && r.Contains(p.Addr()) && p.Contains(a) {
			return true
		}
	}
	return false
}

// Permits is the allow-list rule with safe defaults: an address in a
// special range only when l names it (Names); any other address when l is
// empty or contains it.
func (l List) Permits(a netip.Addr) bool {
	if _, ok := Special(a); ok {
		return l.Names(a)
	}
	return l.Allows(a)
}

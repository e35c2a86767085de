// Package cidr owns address lists given by operators: parsing CIDRs or bare
// addresses, and checking an address against them. IPv4-mapped IPv6
// addresses are taken as the IPv4 address they carry, on both sides, so a
// dual-stack socket cannot slip past an IPv4 rule.
package cidr

import (
	"fmt"
	"net/netip"
	"strings"
)

// List is a set of prefixes.
type List []netip.Prefix

// Parse parses CIDRs or bare addresses (taken as /32 or /128); blank
// entries are skipped. The error names the offending entry.
func Parse(list []string) (List, error) {
	out := make(List, 0, len(list))
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		p, err := ParseOne(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// ParseOne parses one CIDR or bare address, masked and unmapped.
func ParseOne(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is neither a CIDR nor an IP address", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// Contains reports whether ip is in one of the prefixes; an empty list
// contains nothing.
func (l List) Contains(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range l {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// Allows is Contains for an allow list, where an empty list (nothing
// configured) allows every address.
func (l List) Allows(ip netip.Addr) bool { return len(l) == 0 || l.Contains(ip) }

// Strings returns the prefixes in CIDR notation.
func (l List) Strings() []string {
	out := make([]string, len(l))
	for i, p := range l {
		out[i] = p.String()
	}
	return out
}

package ps

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/tether-net/tether/internal/cidr"
)

// exposure decides which addresses an agent may expose (and present as its
// own ip). The rules, in order:
//
//  1. Never the address of a PS node (this one's advertise and interface
//     addresses, every PS in the registry) or of the registry: a route
//     there would hand the PS's or Redis's traffic to an agent.
//  2. A special address (loopback, unspecified, link-local, multicast,
//     broadcast) only when --agent-cidrs names a range inside its class;
//     a catch-all such as 0.0.0.0/0 does not name them.
//  3. Inside --agent-cidrs when that is set.
//  4. Inside the addresses the credential lists (token CIDRs, certificate
//     IP SANs); a credential that lists none may expose only the tunnel's
//     observed source address, i.e. the agent's own.
type exposure struct {
	agentNets cidr.List

	mu       sync.RWMutex
	reserved map[netip.Addr]string // address -> what it belongs to
}

func newExposure(agentNets cidr.List) *exposure {
	return &exposure{agentNets: agentNets, reserved: map[netip.Addr]string{}}
}

// check returns why a may not be exposed by an agent with cred whose
// tunnel comes from source, or "" when it may.
func (e *exposure) check(a netip.Addr, cred *credential, source netip.Addr) string {
	a = a.Unmap()
	e.mu.RLock()
	owner, taken := e.reserved[a]
	e.mu.RUnlock()
	if taken {
		return fmt.Sprintf("%s is the address of %s, which is never exposed", a, owner)
	}
	if class, special := cidr.Special(a); special && !e.agentNets.Names(a) {
		return fmt.Sprintf("%s is in the %s range, exposed only when the ps's --agent-cidrs names it", a, class)
	}
	if len(e.agentNets) > 0 && !e.agentNets.Contains(a) {
		return fmt.Sprintf("%s is outside the ps's --agent-cidrs", a)
	}
	if cred.listsAddrs() {
		if !cred.allows(a) {
			return fmt.Sprintf("%s is outside the addresses this agent's credential lists", a)
		}
		return ""
	}
	if a != source.Unmap() {
		return fmt.Sprintf("%s is not the tunnel's source address %s (a credential must list any other address its agent exposes)", a, source.Unmap())
	}
	return ""
}

// reserve replaces the set of addresses that are never exposed.
func (e *exposure) reserve(m map[netip.Addr]string) {
	e.mu.Lock()
	e.reserved = m
	e.mu.Unlock()
}

// registryResolveEvery is how often a registry named by a host name is
// resolved again for the reserved set: its addresses rarely change, and a
// lookup every period would put DNS on the PS's one-second loop.
const registryResolveEvery = time.Minute

// refreshReserved keeps the addresses that are never exposed up to date:
// after each period until ctx ends it rebuilds them (reservedAddrs), so
// that PS nodes joining the pool are covered within one period. regAddrs
// are the registry's addresses as Run first resolved them.
func (p *PS) refreshReserved(ctx context.Context, period time.Duration, regAddrs []netip.Addr) {
	resolved := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
		if time.Since(resolved) >= registryResolveEvery {
			// A failed lookup keeps the addresses of the last good one.
			if a := registryAddrs(ctx, p.cfg.Redis); len(a) > 0 {
				regAddrs = a
			}
			resolved = time.Now()
		}
		p.exposure.reserve(p.reservedAddrs(ctx, regAddrs))
	}
}

// reservedAddrs builds the reserved set from the registry's addresses
// regAddrs, the PS leases read now, and this host's addresses.
func (p *PS) reservedAddrs(ctx context.Context, regAddrs []netip.Addr) map[netip.Addr]string {
	m := map[netip.Addr]string{}
	add := func(a netip.Addr, what string) {
		if a.IsValid() {
			if _, dup := m[a.Unmap()]; !dup {
				m[a.Unmap()] = what
			}
		}
	}
	// The most specific description wins for an address that is several
	// things (on one host, the registry and the ps may share 127.0.0.1).
	for _, a := range p.advertise {
		add(a, "this ps ("+p.cfg.ID+")")
	}
	for _, a := range regAddrs {
		add(a, "the registry")
	}
	lctx, cancel := context.WithTimeout(ctx, p.cfg.HandshakeTimeout)
	defer cancel()
	leases, err := p.reg.PSLeases(lctx)
	if err != nil {
		p.log.Debug("could not read ps leases for the reserved addresses; keeping the last set", "err", err)
		p.exposure.mu.RLock()
		for a, what := range p.exposure.reserved {
			add(a, what)
		}
		p.exposure.mu.RUnlock()
	}
	for id, l := range leases {
		add(l.Addr, "ps "+id)
		for _, a := range l.Addrs {
			add(a, "ps "+id)
		}
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, ia := range addrs {
			if pfx, err := netip.ParsePrefix(ia.String()); err == nil {
				add(pfx.Addr(), "this ps's host")
			}
		}
	}
	return m
}

// registryAddrs resolves the host of a Redis URL; a unix socket URL or
// one that does not resolve gives none.
func registryAddrs(ctx context.Context, redisURL string) []netip.Addr {
	u, err := url.Parse(redisURL)
	if err != nil || u.Hostname() == "" {
		return nil
	}
	if a, err := netip.ParseAddr(u.Hostname()); err == nil {
		return []netip.Addr{a}
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	addrs, _ := net.DefaultResolver.LookupNetIP(rctx, "ip", u.Hostname())
	return addrs
}

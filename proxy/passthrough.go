package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/tether-net/tether/internal/cidr"
)

// ErrForbidden is a target without a route that --passthrough may not
// reach: a special address (loopback, link-local, ...) not named in
// --passthrough-cidrs, one of the proxy host's own addresses, or an address
// outside --passthrough-cidrs.
var ErrForbidden = errors.New("passthrough may not reach this address")

// Reasons a passthrough target is refused: the values of the reason label
// of tether_proxy_passthrough_refused_total (the first five are the
// classes of cidr.Special).
const (
	reasonLoopback    = "loopback"
	reasonLinkLocal   = "link_local"
	reasonUnspecified = "unspecified"
	reasonMulticast   = "multicast"
	reasonBroadcast   = "broadcast"
	reasonOwnAddress  = "own_address"
	reasonOutside     = "outside_cidrs"
	reasonHostUnknown = "host_addresses_unknown"
)

var passthroughReasons = []string{
	reasonLoopback, reasonLinkLocal, reasonUnspecified, reasonMulticast,
	reasonBroadcast, reasonOwnAddress, reasonOutside, reasonHostUnknown,
}

// passthroughPolicy decides which targets without a route --passthrough
// may dial.
type passthroughPolicy struct {
	allow cidr.List // --passthrough-cidrs; empty = every non-special address
	host  *hostAddrs
}

// check returns "" when passthrough may dial a, else the refusal's reason.
// The proxy host's own addresses are refused whatever the CIDRs say (but
// its loopback ones, which a CIDR inside 127.0.0.0/8 or ::1 may name).
func (pp *passthroughPolicy) check(a netip.Addr) string {
	a = a.Unmap().WithZone("")
	if !a.IsLoopback() {
		own, err := pp.host.contains(a)
		switch {
		case err != nil:
			return reasonHostUnknown
		case own:
			return reasonOwnAddress
		}
	}
	// A special range (loopback, link-local, unspecified, multicast,
	// broadcast) is reached only when a CIDR inside it names the address.
	if class, special := cidr.Special(a); special {
		if pp.allow.Names(a) {
			return ""
		}
		return strings.ReplaceAll(class, "-", "_")
	}
	if !pp.allow.Allows(a) {
		return reasonOutside
	}
	return ""
}

// describe says why a target was refused, for the client and the log.
func describe(reason string) string {
	switch reason {
	case reasonOwnAddress:
		return "it is an address of the proxy host"
	case reasonOutside:
		return "it is outside --passthrough-cidrs"
	case reasonHostUnknown:
		return "the proxy host's own addresses cannot be read"
	}
	return fmt.Sprintf("it is a %s address (allowed only when a range of --passthrough-cidrs inside its class names it)", strings.ReplaceAll(reason, "_", "-"))
}

// hostAddrsTTL is how long a read of the host's addresses is trusted:
// reading takes ~30µs, so passthrough dials re-read at most once a second.
const hostAddrsTTL = time.Second

// hostAddrs caches the proxy host's interface addresses.
type hostAddrs struct {
	read func() ([]net.Addr, error) // net.InterfaceAddrs; replaced in tests

	mu   sync.Mutex
	at   time.Time
	set  map[netip.Addr]bool
	fail error // the last read's error, when no read ever succeeded
}

func newHostAddrs() *hostAddrs { return &hostAddrs{read: net.InterfaceAddrs} }

// contains reports whether a is one of the host's addresses, re-reading
// them when the last read is older than hostAddrsTTL. A failed re-read
// keeps the last good set; with none, contains fails, and passthrough is
// refused rather than risk the host's own services.
func (h *hostAddrs) contains(a netip.Addr) (bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	// A clock that went back re-reads too.
	if now := time.Now(); h.at.IsZero() || now.Sub(h.at) > hostAddrsTTL || now.Before(h.at) {
		h.at = now
		addrs, err := h.read()
		switch {
		case err == nil:
			h.set, h.fail = toAddrSet(addrs), nil
		case h.set == nil:
			h.fail = fmt.Errorf("read the host's addresses: %w", err)
		}
	}
	if h.set == nil {
		return false, h.fail
	}
	return h.set[a], nil
}

func toAddrSet(addrs []net.Addr) map[netip.Addr]bool {
	set := make(map[netip.Addr]bool, len(addrs))
	for _, na := range addrs {
		var ip net.IP
		switch v := na.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			set[a.Unmap()] = true
		}
	}
	return set
}

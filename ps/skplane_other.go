//go:build !linux

package ps

import (
	"errors"
	"log/slog"
	"net/netip"
)

var errSKLookupNeedsLinux = errors.New("the sk_lookup data plane needs Linux")

// skLookupPlane exists on Linux only (skplane_linux.go); elsewhere the PS
// falls back to per-port listeners, or stops when sk_lookup was asked for.
type skLookupPlane struct{}

func newSKLookupPlane(_ []netip.Addr, _ int, _ connHandler, _ *slog.Logger, _ bool) (*skLookupPlane, error) {
	return nil, errSKLookupNeedsLinux
}

func (*skLookupPlane) Open(netip.AddrPort) error { return errSKLookupNeedsLinux }
func (*skLookupPlane) Release(netip.AddrPort)    {}
func (*skLookupPlane) Close() error              { return nil }
func (*skLookupPlane) Name() string              { return DataPlaneSKLookup }

func (*skLookupPlane) counters() (steered, assignFailed uint64, err error) { return 0, 0, nil }
func (*skLookupPlane) unclaimedResets() uint64                             { return 0 }

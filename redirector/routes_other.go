//go:build !linux

package redirector

import (
	"context"
	"net/netip"
	"time"

	"github.com/tether-net/tether/internal/cidr"
)

// ReadRoutes reports that the redirector is not supported here.
func ReadRoutes(string, netip.AddrPort) ([]KernelRoute, error) { return nil, ErrNotSupported }

// CheckRoutes reports that the redirector is not supported here.
func CheckRoutes(context.Context, string, Snapshotter, cidr.List, netip.AddrPort, time.Duration) (RouteCheck, error) {
	return RouteCheck{}, ErrNotSupported
}

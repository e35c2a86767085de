//go:build !linux

package redirector

import (
	"context"
	"errors"
)

// ErrNotSupported is returned on systems without eBPF cgroup hooks.
var ErrNotSupported = errors.New("the eBPF redirector needs Linux (cgroup v2, kernel >= 5.18); use `tether proxy` (SOCKS5/HTTP) on this system")

// Redirector is not available on this system.
type Redirector struct{}

// New reports that the redirector is not supported here.
func New(Config) (*Redirector, error) { return nil, ErrNotSupported }

// Run reports that the redirector is not supported here.
func (*Redirector) Run(context.Context) error { return ErrNotSupported }

// Close does nothing.
func (*Redirector) Close() error { return nil }

// Ready never closes.
func (*Redirector) Ready() <-chan struct{} { return nil }

// ReadStatus reports that the redirector is not supported here.
func ReadStatus(string) (Status, error) { return Status{}, ErrNotSupported }

// Uninstall reports that the redirector is not supported here.
func Uninstall(string) error { return ErrNotSupported }

// ResolveCgroup reports that the redirector is not supported here.
func ResolveCgroup(string) (string, error) { return "", ErrNotSupported }

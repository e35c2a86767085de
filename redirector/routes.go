package redirector

import "net/netip"

// The kernel route map as `tether redirector routes` shows it (read by
// routes_linux.go, compared with the registry by routecheck.go).

// KernelRoute is one entry of the kernel route map, decoded.
type KernelRoute struct {
	Target   netip.AddrPort  `json:"target"`
	Backends []KernelBackend `json:"backends"`
}

// KernelBackend is one used slot of a route's value, with what the connect
// hooks look up about it when they choose.
type KernelBackend struct {
	Slot    int            `json:"slot"`
	Address netip.AddrPort `json:"address"`
	// State is the slot's state by name: live, draining, dead (or
	// state_N for a value no version of tether writes).
	State string `json:"state"`
	// DeadlineLeftSeconds is how long until the deadline of the backend's
	// PS address passes (negative: passed; the backend is no longer
	// picked); nil when the address has none (then it is not checked).
	DeadlineLeftSeconds *float64 `json:"deadline_left_seconds,omitempty"`
	// Suspect is the backend's passive health mark; nil when unmarked.
	Suspect *SuspectMark `json:"suspect,omitempty"`
	// Usable says whether a connect may be sent there now: live and its
	// deadline not passed. A suspect backend is still usable (it is only
	// avoided while another usable one is unmarked).
	Usable bool `json:"usable"`
}

// SuspectMark is a backend's entry in tether_suspect.
type SuspectMark struct {
	MarkedSecondsAgo float64 `json:"marked_seconds_ago"`
	// WithinHoldDown: connects avoid the backend while another usable
	// backend of the route is unmarked.
	WithinHoldDown bool `json:"within_hold_down"`
}

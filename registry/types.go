package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/tether-net/tether/internal/textclip"
)

// Errors returned by the registry. Callers match them with errors.Is.
var (
	// ErrNotFound means the target has no live backend.
	ErrNotFound = errors.New("route not found")
	// ErrConflict means another agent holds a live backend for the target.
	ErrConflict = errors.New("target is held by another live agent")
	// ErrCursorLost means the change feed no longer holds the reader's
	// position (trimmed, or the stream was reset); the reader must resync.
	ErrCursorLost = errors.New("change feed cursor lost, full resync needed")
	// ErrBadData means a value in Redis could not be decoded.
	ErrBadData = errors.New("malformed registry data")
)

// PSState is the state a PS advertises in its lease.
type PSState string

// PS states. Only an active PS with a live lease receives new connections.
const (
	PSActive   PSState = "active"
	PSDraining PSState = "draining"
)

// PSLease is what a PS renews: its id, the address clients reach it at, its
// state, and when the lease lapses.
type PSLease struct {
	ID        string
	Addr      netip.Addr
	State     PSState
	ExpiresAt time.Time
}

// Live reports whether the PS may receive new connections at now.
func (l PSLease) Live(now time.Time) bool {
	return l.State == PSActive && now.Before(l.ExpiresAt)
}

// Publication is one backend a PS publishes: target -> (this PS, Port).
type Publication struct {
	Target  netip.AddrPort
	Port    uint16
	AgentID string
}

// Backend is one way to reach a route's target: a port on a PS.
type Backend struct {
	PSID      string         `json:"ps_id"`
	Address   netip.AddrPort `json:"address"` // PS ip:port to connect to
	AgentID   string         `json:"agent_id"`
	ExpiresAt time.Time      `json:"expires_at"` // the PS lease's expiry
	Draining  bool           `json:"draining,omitempty"`
}

// Live reports whether the backend may receive new connections at now.
func (b Backend) Live(now time.Time) bool {
	return !b.Draining && now.Before(b.ExpiresAt)
}

// Route is a target and its backends.
type Route struct {
	Target   netip.AddrPort `json:"target"`
	Backends []Backend      `json:"backends"`
}

// LiveBackends returns the backends of r that are live at now.
func (r Route) LiveBackends(now time.Time) []Backend {
	out := make([]Backend, 0, len(r.Backends))
	for _, b := range r.Backends {
		if b.Live(now) {
			out = append(out, b)
		}
	}
	return out
}

// MarshalJSON writes expires_at in RFC 3339 with UTC.
func (b Backend) MarshalJSON() ([]byte, error) {
	type wire struct {
		PSID      string `json:"ps_id"`
		Address   string `json:"address"`
		AgentID   string `json:"agent_id"`
		ExpiresAt string `json:"expires_at"`
		Draining  bool   `json:"draining,omitempty"`
	}
	return json.Marshal(wire{b.PSID, b.Address.String(), b.AgentID, b.ExpiresAt.UTC().Format(time.RFC3339Nano), b.Draining})
}

// entry is the JSON stored in a route hash field.
type entry struct {
	Port    uint16 `json:"port"`
	AgentID string `json:"agent_id"`
}

func decodeEntry(raw string) (entry, error) {
	var e entry
	if err := json.Unmarshal([]byte(raw), &e); err != nil {
		return e, fmt.Errorf("%w: route entry %q: %v", ErrBadData, textclip.Short(raw), err)
	}
	if e.Port == 0 || e.AgentID == "" {
		return e, fmt.Errorf("%w: route entry %q lacks port or agent_id", ErrBadData, textclip.Short(raw))
	}
	return e, nil
}

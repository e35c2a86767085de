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
	// ErrConflict means another agent, or the same agent id under another
	// credential, holds a live backend for the target (see ConflictError).
	ErrConflict = errors.New("target is held by another live agent")
	// ErrCursorLost means the change feed no longer holds the reader's
	// position (trimmed, or the stream was reset); the reader must resync.
	ErrCursorLost = errors.New("change feed cursor lost, full resync needed")
	// ErrBadData means a value in Redis could not be decoded.
	ErrBadData = errors.New("malformed registry data")
	// ErrLeaseHeld means ClaimPS found the id's lease live under another
	// instance's nonce (see LeaseHeldError).
	ErrLeaseHeld = errors.New("ps id is held by another live instance")
	// ErrLeaseTaken means a write on behalf of a claimed PS id (renew,
	// publish, withdraw, forget) found the lease under another instance's
	// nonce: another instance took the id over, and nothing was written.
	ErrLeaseTaken = errors.New("ps lease taken over by another instance")
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
//
// Lease expiry is judged on one clock, Redis's (TIME): a writer sends how
// long the lease lasts and Redis stores its own now plus that. A reader
// converts what it reads into its own clock (see ExpiresAt), so no two
// hosts' wall clocks are ever compared.
type PSLease struct {
	ID string
	// Addr is the PS's primary address: the one older readers, which know
	// no other, use for every backend of the PS.
	Addr netip.Addr
	// Addrs is every address the PS advertises, Addr first. A writer may
	// leave it nil, which means [Addr]; when set it must contain Addr.
	// Every lease read back from the registry has it (at least [Addr]).
	// A PS allocates its ports across all of them, so a backend's port is
	// only meaningful with its address (see Publication.Addr).
	Addrs []netip.Addr
	State PSState
	// Nonce names the instance (process) that holds the id: random, made
	// at its start. A writer that sets it claims the id (ClaimPS) and has
	// its renewals guarded; "" (tests, tools) writes without a guard.
	Nonce string
	// TTL is what a writer (RenewPS) sets: how long the lease lasts,
	// counted by Redis from the moment it applies the renewal. Readers
	// leave it zero.
	TTL time.Duration
	// ExpiresAt, in a lease read back from the registry, is when the lease
	// lapses on the reader's clock (Config.Now, with its monotonic reading):
	// the reader's time when it sent the read plus the time Redis had left
	// on the lease then. It is never later than Redis's own judgement, and a
	// reader's clock skew or wall-clock step does not move it.
	//
	// A writer may set ExpiresAt on its own clock (Config.Now) instead of
	// TTL; RenewPS then sends ExpiresAt minus its now as the TTL.
	ExpiresAt time.Time
}

// HasAddr reports whether a is one of the addresses the PS advertises.
func (l PSLease) HasAddr(a netip.Addr) bool {
	if len(l.Addrs) == 0 {
		return a == l.Addr
	}
	for _, x := range l.Addrs {
		if x == a {
			return true
		}
	}
	return false
}

// Live reports whether the PS may receive new connections at now.
func (l PSLease) Live(now time.Time) bool {
	return l.State == PSActive && now.Before(l.ExpiresAt)
}

// Publication is one backend a PS publishes: target -> (this PS, Addr, Port).
type Publication struct {
	Target netip.AddrPort
	// Addr is the PS address of the port assigned to the target, one of
	// the lease's Addrs. The zero Addr means the lease's (primary) Addr, as
	// callers that know one address only mean.
	Addr    netip.Addr
	Port    uint16
	AgentID string
	// Owner is an opaque name of the credential the agent authenticated
	// with (e.g. "tok:3f2a9c1b", "cert:a1"), "" when there is none. A
	// publication is refused while another PS holds a live backend for the
	// target under the same agent id and a different non-empty owner.
	Owner string
}

// Backend is one way to reach a route's target: a port on a PS.
type Backend struct {
	PSID    string         `json:"ps_id"`
	Address netip.AddrPort `json:"address"` // PS ip:port to connect to
	AgentID string         `json:"agent_id"`
	Owner   string         `json:"owner,omitempty"` // the agent's credential, see Publication
	// ExpiresAt is the PS lease's expiry on the reader's clock (see
	// PSLease.ExpiresAt).
	ExpiresAt time.Time `json:"expires_at"`
	Draining  bool      `json:"draining,omitempty"`
	// Lost: the agent reported its tunnel to this PS lost (DropBackends).
	// The backend is dead at once, whatever the PS's lease says, and
	// readers destroy the client sockets redirected to it, as for a PS
	// whose lease lapsed. A publication by the PS clears it.
	Lost bool `json:"lost,omitempty"`
}

// Live reports whether the backend may receive new connections at now.
func (b Backend) Live(now time.Time) bool {
	return !b.Draining && !b.Lost && now.Before(b.ExpiresAt)
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
		Owner     string `json:"owner,omitempty"`
		ExpiresAt string `json:"expires_at"`
		Draining  bool   `json:"draining,omitempty"`
	}
	return json.Marshal(wire{b.PSID, b.Address.String(), b.AgentID, b.Owner, b.ExpiresAt.UTC().Format(time.RFC3339Nano), b.Draining})
}

// LeaseHeldError is what ClaimPS returns when another instance holds the
// id's lease, live: its address, how long its lease has left, and when it
// was last renewed (unix ms on Redis's clock, to tell a live holder, whose
// renewals move it, from a crashed one). It wraps ErrLeaseHeld.
type LeaseHeldError struct {
	ID        string
	Addr      string
	Nonce     string
	ExpiresIn time.Duration
	RenewedMS int64
}

func (e *LeaseHeldError) Error() string {
	return fmt.Sprintf("ps id %s is held by a live instance at %s (lease expires in %v)",
		e.ID, textclip.Short(e.Addr), e.ExpiresIn.Round(100*time.Millisecond))
}

func (e *LeaseHeldError) Unwrap() error { return ErrLeaseHeld }

// ConflictError is the error Publish returns for a publication refused
// because the target is held: by another agent, or by the same agent id
// under another credential (OtherCredential). It wraps ErrConflict.
type ConflictError struct {
	Target          netip.AddrPort
	Holder          string // the agent id of the live holder
	OtherCredential bool
}

func (e *ConflictError) Error() string {
	if e.OtherCredential {
		return fmt.Sprintf("%v: %s is held by agent %q with another credential", ErrConflict, e.Target, e.Holder)
	}
	return fmt.Sprintf("%v: %s is held by agent %q", ErrConflict, e.Target, e.Holder)
}

func (e *ConflictError) Unwrap() error { return ErrConflict }

// entry is the JSON stored in a route hash field. Owner is absent in
// entries written before owners existed, which reads as "". Addr is the
// address in the PS's lease when the entry was published (absent in older
// entries, and when the PS had no lease yet).
type entry struct {
	Port    uint16 `json:"port"`
	AgentID string `json:"agent_id"`
	Owner   string `json:"owner,omitempty"`
	Addr    string `json:"addr,omitempty"`
	Lost    bool   `json:"lost,omitempty"` // see Backend.Lost
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

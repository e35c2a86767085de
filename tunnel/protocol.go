package tunnel

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/internal/textclip"
)

// Version is the protocol version this package speaks. SPEC.md describes it.
const Version = 1

// Magic opens every tunnel connection, before the version byte.
var Magic = [4]byte{'T', 'T', 'H', 'R'}

// Limits of the handshake. A message larger than MaxMessageSize is refused
// before it is read; MaxEndpoints bounds one Hello (and one Welcome).
const (
	MaxMessageSize = 1 << 20 // fits MaxEndpoints IPv6 endpoints with room to spare
	MaxEndpoints   = 50000
	MaxIDLen       = ident.MaxLen
	MaxTokenLen    = 4096
	MaxReasonLen   = 1024
	MaxHeldPS      = 16
)

// Message types of the handshake frames.
const (
	msgHello   byte = 1
	msgWelcome byte = 2
	msgRefuse  byte = 3
)

// Errors of the protocol layer. Callers match them with errors.Is.
var (
	// ErrMalformed means bytes on the wire do not decode as the protocol says.
	ErrMalformed = errors.New("malformed message")
	// ErrBadMagic means the peer does not speak the tether tunnel protocol.
	ErrBadMagic = errors.New("not a tether tunnel (bad magic)")
	// ErrVersion means the peer speaks a version this package does not.
	ErrVersion = errors.New("unsupported protocol version")
	// ErrTooLarge means a frame exceeds its size limit.
	ErrTooLarge = errors.New("message too large")
	// ErrRefused means the peer refused the handshake or the stream; the
	// error text carries the peer's code and reason.
	ErrRefused = errors.New("refused")
)

// Code is a refusal code, on a whole handshake (Refuse) or on one endpoint.
type Code uint16

// Refusal codes. SPEC.md lists them; new codes may be added, and a peer that
// does not know a code still shows its reason text.
const (
	CodeOK           Code = 0
	CodeBadRequest   Code = 1  // malformed or invalid Hello
	CodeVersion      Code = 2  // unsupported protocol version
	CodeUnauthorized Code = 3  // wrong or missing token, or client certificate
	CodeBusy         Code = 4  // the PS is at its handshake limit; retry later
	CodeStaleEpoch   Code = 5  // a newer session of this agent exists here
	CodeUnavailable  Code = 6  // the PS cannot reach the registry, or is draining
	CodeTooLarge     Code = 7  // a frame exceeded its limit
	CodeDuplicatePS  Code = 8  // the agent already holds a tunnel on this PS
	CodeForbidden    Code = 9  // endpoint outside the CIDRs the agent may expose
	CodeConflict     Code = 10 // endpoint held by another live agent
	CodeNoPorts      Code = 11 // the PS has no free port
	CodeInternal     Code = 12
	CodeTimeout      Code = 13 // the handshake missed its deadline
	CodeQuota        Code = 14 // the credential's tunnel or endpoint quota on this PS is used up
)

var codeNames = map[Code]string{
	CodeOK: "ok", CodeBadRequest: "bad_request", CodeVersion: "unsupported_version",
	CodeUnauthorized: "unauthorized", CodeBusy: "busy", CodeStaleEpoch: "stale_epoch",
	CodeUnavailable: "unavailable", CodeTooLarge: "too_large", CodeDuplicatePS: "duplicate_ps",
	CodeForbidden: "forbidden", CodeConflict: "conflict", CodeNoPorts: "no_ports",
	CodeInternal: "internal", CodeTimeout: "timeout", CodeQuota: "quota",
}

// RefusalCodes returns every refusal code this package knows (CodeOK
// excluded), so metrics can show each one at zero before it happens.
func RefusalCodes() []Code { return refusals(codeNames, CodeOK) }

// String returns the snake_case name of c, used in logs and metrics.
func (c Code) String() string { return codeName(codeNames, c) }

// refusals returns the codes of names other than ok, in order.
func refusals[C ~uint8 | ~uint16](names map[C]string, ok C) []C {
	out := make([]C, 0, len(names))
	for c := range names {
		if c != ok {
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out
}

// codeName is c's name in names, or code_N for a code this version does
// not know (a newer peer may send one).
func codeName[C ~uint8 | ~uint16](names map[C]string, c C) string {
	if s, ok := names[c]; ok {
		return s
	}
	return fmt.Sprintf("code_%d", c)
}

// Hello is what an agent presents when it opens a tunnel.
type Hello struct {
	AgentID string
	AgentIP netip.Addr
	Token   string
	// Epoch orders the sessions of one agent: on one PS the highest epoch
	// wins, an older one is refused.
	Epoch uint64
	// HeldPS lists the PS ids the agent already holds a tunnel on; a PS
	// whose id is listed refuses with CodeDuplicatePS before touching any
	// state, so the agent's tunnels land on distinct PS nodes.
	HeldPS    []string
	Endpoints []netip.AddrPort
}

// EndpointResult is the PS's answer for one endpoint of a Hello.
type EndpointResult struct {
	Port   uint16 // the port on the PS; 0 when refused
	Code   Code   // CodeOK, or why the endpoint was refused
	Reason string
}

// Welcome accepts a tunnel: one result per endpoint, in Hello's order.
type Welcome struct {
	PSID      string
	PSAddr    netip.Addr
	Endpoints []EndpointResult
}

// Refuse rejects a whole handshake.
type Refuse struct {
	Code   Code
	Reason string
}

// Error makes a Refuse usable as an error matching ErrRefused.
func (r *Refuse) Error() string { return fmt.Sprintf("refused (%s): %s", r.Code, r.Reason) }

// Unwrap lets errors.Is(err, ErrRefused) match.
func (r *Refuse) Unwrap() error { return ErrRefused }

// EncodeHello returns the payload of a Hello frame.
func EncodeHello(h *Hello) ([]byte, error) {
	if err := h.Validate(); err != nil {
		return nil, err
	}
	e := encoder{b: make([]byte, 0, 64+len(h.Token)+len(h.Endpoints)*19)}
	e.str(h.AgentID)
	e.addr(h.AgentIP)
	e.str(h.Token)
	e.u64(h.Epoch)
	e.u8(byte(len(h.HeldPS)))
	for _, id := range h.HeldPS {
		e.str(id)
	}
	e.u32(uint32(len(h.Endpoints)))
	for _, ep := range h.Endpoints {
		e.addrPort(ep)
	}
	if len(e.b) > MaxMessageSize {
		return nil, fmt.Errorf("encode hello: %w: %d bytes, limit %d", ErrTooLarge, len(e.b), MaxMessageSize)
	}
	return e.b, nil
}

// DecodeHello parses and validates the payload of a Hello frame.
func DecodeHello(b []byte) (*Hello, error) {
	d := decoder{b: b}
	h := &Hello{}
	h.AgentID = d.str("agent id", MaxIDLen)
	h.AgentIP = d.addr("agent ip", false)
	h.Token = d.str("token", MaxTokenLen)
	h.Epoch = d.u64("epoch")
	nHeld := int(d.u8("held ps count"))
	if nHeld > MaxHeldPS {
		d.fail("held ps count %d, limit %d", nHeld, MaxHeldPS)
	}
	for i := 0; i < nHeld && d.err == nil; i++ {
		h.HeldPS = append(h.HeldPS, d.str("held ps id", MaxIDLen))
	}
	n := int(d.u32("endpoint count"))
	if d.err == nil && n > MaxEndpoints {
		d.fail("%d endpoints, limit %d", n, MaxEndpoints)
	}
	if d.err == nil && n*7 > len(d.b) { // 7 = smallest encoded endpoint
		d.fail("endpoint count %d does not fit the remaining %d bytes", n, len(d.b))
	}
	if d.err == nil {
		h.Endpoints = make([]netip.AddrPort, 0, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		h.Endpoints = append(h.Endpoints, d.addrPort("endpoint", false))
	}
	if err := d.end("hello"); err != nil {
		return nil, err
	}
	if err := h.Validate(); err != nil {
		return nil, err
	}
	return h, nil
}

// Validate checks the rules a Hello must follow beyond its encoding.
func (h *Hello) Validate() error {
	if err := ident.Valid(h.AgentID); err != nil {
		return fmt.Errorf("%w: agent id: %w", ErrMalformed, err)
	}
	if !h.AgentIP.IsValid() {
		return fmt.Errorf("%w: agent ip missing", ErrMalformed)
	}
	if len(h.Token) > MaxTokenLen {
		return fmt.Errorf("%w: token longer than %d bytes", ErrMalformed, MaxTokenLen)
	}
	if len(h.HeldPS) > MaxHeldPS {
		return fmt.Errorf("%w: %d held ps ids, limit %d", ErrMalformed, len(h.HeldPS), MaxHeldPS)
	}
	for _, id := range h.HeldPS {
		if err := ident.Valid(id); err != nil {
			return fmt.Errorf("%w: held ps id: %w", ErrMalformed, err)
		}
	}
	if len(h.Endpoints) > MaxEndpoints {
		return fmt.Errorf("%w: %d endpoints, limit %d", ErrMalformed, len(h.Endpoints), MaxEndpoints)
	}
	for _, ep := range h.Endpoints {
		if !ep.IsValid() || ep.Port() == 0 || ep.Addr().IsUnspecified() || ep.Addr().Is4In6() || ep.Addr().Zone() != "" {
			return fmt.Errorf("%w: endpoint %s is not a usable ip:port", ErrMalformed, ep)
		}
	}
	return nil
}

// EncodeWelcome returns the payload of a Welcome frame.
func EncodeWelcome(w *Welcome) ([]byte, error) {
	if err := ident.Valid(w.PSID); err != nil {
		return nil, fmt.Errorf("encode welcome: ps id: %w", err)
	}
	if len(w.Endpoints) > MaxEndpoints {
		return nil, fmt.Errorf("encode welcome: %w: %d endpoints", ErrTooLarge, len(w.Endpoints))
	}
	e := encoder{b: make([]byte, 0, 32+len(w.Endpoints)*4)}
	e.str(w.PSID)
	e.addr(w.PSAddr)
	e.u32(uint32(len(w.Endpoints)))
	for _, r := range w.Endpoints {
		if r.Code == CodeOK {
			if r.Port == 0 {
				return nil, fmt.Errorf("encode welcome: accepted endpoint without a port")
			}
			e.u16(r.Port)
			continue
		}
		e.u16(0)
		e.u16(uint16(r.Code))
		e.str(textclip.Clip(r.Reason, MaxReasonLen))
	}
	if len(e.b) > MaxMessageSize {
		return nil, fmt.Errorf("encode welcome: %w: %d bytes", ErrTooLarge, len(e.b))
	}
	return e.b, nil
}

// DecodeWelcome parses the payload of a Welcome frame.
func DecodeWelcome(b []byte) (*Welcome, error) {
	d := decoder{b: b}
	w := &Welcome{}
	w.PSID = d.str("ps id", MaxIDLen)
	w.PSAddr = d.addr("ps addr", true)
	n := int(d.u32("endpoint count"))
	if d.err == nil && (n > MaxEndpoints || n*2 > len(d.b)) {
		d.fail("endpoint count %d with %d bytes left", n, len(d.b))
	}
	if d.err == nil {
		w.Endpoints = make([]EndpointResult, 0, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		var r EndpointResult
		r.Port = d.u16("port")
		if r.Port == 0 {
			r.Code = Code(d.u16("code"))
			r.Reason = d.str("reason", MaxReasonLen)
			if r.Code == CodeOK {
				d.fail("endpoint %d: no port and no refusal code", i)
			}
		}
		w.Endpoints = append(w.Endpoints, r)
	}
	if err := d.end("welcome"); err != nil {
		return nil, err
	}
	if err := ident.Valid(w.PSID); err != nil {
		return nil, fmt.Errorf("%w: ps id: %w", ErrMalformed, err)
	}
	return w, nil
}

// EncodeRefuse returns the payload of a Refuse frame.
func EncodeRefuse(r *Refuse) []byte {
	e := encoder{}
	e.u16(uint16(r.Code))
	e.str(textclip.Clip(r.Reason, MaxReasonLen))
	return e.b
}

// DecodeRefuse parses the payload of a Refuse frame.
func DecodeRefuse(b []byte) (*Refuse, error) {
	d := decoder{b: b}
	r := &Refuse{Code: Code(d.u16("code"))}
	r.Reason = d.str("reason", MaxReasonLen)
	if err := d.end("refuse"); err != nil {
		return nil, err
	}
	return r, nil
}

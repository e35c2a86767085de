package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"unicode/utf8"
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
	MaxIDLen       = 128
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
)

var codeNames = map[Code]string{
	CodeOK: "ok", CodeBadRequest: "bad_request", CodeVersion: "unsupported_version",
	CodeUnauthorized: "unauthorized", CodeBusy: "busy", CodeStaleEpoch: "stale_epoch",
	CodeUnavailable: "unavailable", CodeTooLarge: "too_large", CodeDuplicatePS: "duplicate_ps",
	CodeForbidden: "forbidden", CodeConflict: "conflict", CodeNoPorts: "no_ports",
	CodeInternal: "internal", CodeTimeout: "timeout",
}

// String returns the snake_case name of c, used in logs and metrics.
func (c Code) String() string {
	if s, ok := codeNames[c]; ok {
		return s
	}
	return fmt.Sprintf("code_%d", uint16(c))
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

// ---- encoding --------------------------------------------------------------

type encoder struct{ b []byte }

func (e *encoder) u8(v byte)    { e.b = append(e.b, v) }
func (e *encoder) u16(v uint16) { e.b = binary.BigEndian.AppendUint16(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *encoder) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }
func (e *encoder) str(s string) { e.u16(uint16(len(s))); e.b = append(e.b, s...) }
func (e *encoder) addr(a netip.Addr) {
	if !a.IsValid() {
		e.u8(0)
		return
	}
	a = a.Unmap()
	s := a.AsSlice()
	e.u8(byte(len(s)))
	e.b = append(e.b, s...)
}
func (e *encoder) addrPort(ap netip.AddrPort) { e.addr(ap.Addr()); e.u16(ap.Port()) }

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
	}
}

func (d *decoder) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n > len(d.b) {
		d.fail("%s: need %d bytes, %d left", what, n, len(d.b))
		return nil
	}
	out := d.b[:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) u8(what string) byte {
	if b := d.take(1, what); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u16(what string) uint16 {
	if b := d.take(2, what); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (d *decoder) u32(what string) uint32 {
	if b := d.take(4, what); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64(what string) uint64 {
	if b := d.take(8, what); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

// str reads a length-prefixed UTF-8 string of at most max bytes.
func (d *decoder) str(what string, max int) string {
	n := int(d.u16(what + " length"))
	if d.err != nil {
		return ""
	}
	if n > max {
		d.fail("%s: %d bytes, limit %d", what, n, max)
		return ""
	}
	b := d.take(n, what)
	if d.err != nil {
		return ""
	}
	if !utf8.Valid(b) {
		d.fail("%s: not valid UTF-8", what)
		return ""
	}
	return string(b)
}

// addr reads an address: a length byte (0, 4 or 16) and the bytes. A zero
// length is an absent address, allowed only where optional says so.
func (d *decoder) addr(what string, optional bool) netip.Addr {
	n := d.u8(what + " length")
	if d.err != nil {
		return netip.Addr{}
	}
	switch n {
	case 0:
		if !optional {
			d.fail("%s: missing", what)
		}
		return netip.Addr{}
	case 4, 16:
		b := d.take(int(n), what)
		if d.err != nil {
			return netip.Addr{}
		}
		a, _ := netip.AddrFromSlice(b)
		if n == 16 && a.Is4In6() {
			d.fail("%s: IPv4-mapped IPv6 address %s, send it as IPv4", what, a)
			return netip.Addr{}
		}
		return a
	default:
		d.fail("%s: address length %d, want 4 or 16", what, n)
		return netip.Addr{}
	}
}

func (d *decoder) addrPort(what string, optional bool) netip.AddrPort {
	a := d.addr(what, optional)
	p := d.u16(what + " port")
	if d.err == nil && !a.IsValid() && p != 0 {
		// One encoding per value: an absent address has port 0.
		d.fail("%s: port %d without an address", what, p)
	}
	if d.err != nil || !a.IsValid() {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a, p)
}

func (d *decoder) end(what string) error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%s: %d trailing bytes", what, len(d.b))
	}
	return d.err
}

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
	if err := ValidID(h.AgentID); err != nil {
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
		if err := ValidID(id); err != nil {
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

// ValidID checks an agent or PS id: 1-128 printable ASCII characters without
// blanks, braces or colons (the registry's key syntax).
func ValidID(id string) error {
	if id == "" || len(id) > MaxIDLen {
		return fmt.Errorf("id %q: must be 1-%d characters", truncate(id), MaxIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= ' ' || c >= 0x7f || c == '{' || c == '}' || c == ':' {
			return fmt.Errorf("id %q: character %q not allowed (printable ASCII without blanks, braces or colons)", truncate(id), c)
		}
	}
	return nil
}

// EncodeWelcome returns the payload of a Welcome frame.
func EncodeWelcome(w *Welcome) ([]byte, error) {
	if err := ValidID(w.PSID); err != nil {
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
		e.str(clip(r.Reason, MaxReasonLen))
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
	if err := ValidID(w.PSID); err != nil {
		return nil, fmt.Errorf("%w: ps id: %w", ErrMalformed, err)
	}
	return w, nil
}

// EncodeRefuse returns the payload of a Refuse frame.
func EncodeRefuse(r *Refuse) []byte {
	e := encoder{}
	e.u16(uint16(r.Code))
	e.str(clip(r.Reason, MaxReasonLen))
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

// ---- framing ---------------------------------------------------------------

// writePreamble writes the magic and the version.
func writePreamble(w io.Writer, version byte) error {
	var p [5]byte
	copy(p[:], Magic[:])
	p[4] = version
	if _, err := w.Write(p[:]); err != nil {
		return fmt.Errorf("write preamble: %w", err)
	}
	return nil
}

// readPreamble reads the magic and returns the version the peer speaks.
func readPreamble(r io.Reader) (byte, error) {
	var p [5]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		return 0, fmt.Errorf("read preamble: %w", err)
	}
	if [4]byte(p[:4]) != Magic {
		return 0, fmt.Errorf("%w: got %q", ErrBadMagic, p[:4])
	}
	return p[4], nil
}

// writeFrame writes one frame: type byte, big-endian uint32 length, payload.
func writeFrame(w io.Writer, typ byte, payload []byte) error {
	buf := make([]byte, 5, 5+len(payload))
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:], uint32(len(payload)))
	buf = append(buf, payload...)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}

// readFrame reads one frame, refusing a declared length above max before
// reading the payload.
func readFrame(r io.Reader, max int) (byte, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("read frame header: %w", err)
	}
	n := binary.BigEndian.Uint32(h[1:])
	if int64(n) > int64(max) {
		return h[0], nil, fmt.Errorf("%w: frame of %d bytes, limit %d", ErrTooLarge, n, max)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, fmt.Errorf("read frame payload: %w", err)
	}
	return h[0], payload, nil
}

func clip(s string, n int) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) <= n {
		return s
	}
	// Cut at a rune boundary so the result stays valid UTF-8.
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

func truncate(s string) string {
	if len(s) > 64 {
		return clip(s, 64) + "..."
	}
	return s
}

package tunnel

import (
	"fmt"
	"io"
	"net/netip"

	"github.com/tether-net/tether/internal/textclip"
)

// StreamVersion is the version byte that opens every stream header.
const StreamVersion = 1

// MaxStreamHeader bounds the payload of a stream header: two IPv6
// address:port pairs with their length bytes take 38 bytes.
const MaxStreamHeader = 64

// StreamHeader opens every stream the PS sends to an agent: which endpoint
// the connection is for, and where it came from (for the agent's logs).
type StreamHeader struct {
	Target netip.AddrPort
	Source netip.AddrPort // may be the zero value
}

// StreamCode is the agent's answer to a stream header.
type StreamCode byte

// Stream status codes.
const (
	StreamOK          StreamCode = 0
	StreamNotExposed  StreamCode = 1 // the agent does not expose the target
	StreamDialRefused StreamCode = 2 // the local target refused the connection
	StreamDialTimeout StreamCode = 3 // dialing the local target timed out
	StreamDialFailed  StreamCode = 4 // any other dial error
	StreamBadHeader   StreamCode = 5 // the header did not decode
	StreamVersionErr  StreamCode = 6 // unknown stream header version
	StreamBusy        StreamCode = 7 // the agent is at its stream limit
	// StreamPoolRefused is the PS's answer to a data connection it does not
	// take into a pool: unknown key, session gone, pool full, or a client
	// certificate naming another agent (data.go).
	StreamPoolRefused StreamCode = 8
)

var streamCodeNames = map[StreamCode]string{
	StreamOK: "ok", StreamNotExposed: "not_exposed", StreamDialRefused: "dial_refused",
	StreamDialTimeout: "dial_timeout", StreamDialFailed: "dial_failed", StreamBadHeader: "bad_header",
	StreamVersionErr: "unsupported_version", StreamBusy: "busy", StreamPoolRefused: "pool_refused",
}

// StreamRefusalCodes returns every stream refusal code this package knows
// (StreamOK excluded), so metrics can show each one at zero.
func StreamRefusalCodes() []StreamCode { return refusals(streamCodeNames, StreamOK) }

// String returns the snake_case name of c.
func (c StreamCode) String() string { return codeName(streamCodeNames, c) }

// StreamStatus is the agent's answer: StreamOK, or a code and a message.
type StreamStatus struct {
	Code    StreamCode
	Message string
}

// StreamError is a refused stream, as the PS sees it.
type StreamError struct{ StreamStatus }

func (e *StreamError) Error() string {
	return fmt.Sprintf("stream refused by agent (%s): %s", e.Code, e.Message)
}

// Unwrap lets errors.Is(err, ErrRefused) match.
func (e *StreamError) Unwrap() error { return ErrRefused }

// MaxStatusMessage bounds a stream status message.
const MaxStatusMessage = 255

// EncodeStreamHeader returns the bytes of h on the wire: version, payload
// length, payload.
func EncodeStreamHeader(h StreamHeader) ([]byte, error) {
	if !h.Target.IsValid() || h.Target.Port() == 0 {
		return nil, fmt.Errorf("encode stream header: target %s is not a usable ip:port", h.Target)
	}
	e := encoder{b: make([]byte, 2, 2+40)}
	e.b[0] = StreamVersion
	e.addrPort(h.Target)
	if h.Source.IsValid() {
		e.addrPort(h.Source)
	} else {
		e.u8(0)
		e.u16(0)
	}
	e.b[1] = byte(len(e.b) - 2)
	return e.b, nil
}

// DecodeStreamHeader parses a stream header payload (the bytes after the
// version and length bytes).
func DecodeStreamHeader(b []byte) (StreamHeader, error) {
	if len(b) > MaxStreamHeader {
		return StreamHeader{}, fmt.Errorf("%w: stream header of %d bytes, limit %d", ErrTooLarge, len(b), MaxStreamHeader)
	}
	d := decoder{b: b}
	var h StreamHeader
	h.Target = d.addrPort("target", false)
	h.Source = d.addrPort("source", true)
	if err := d.end("stream header"); err != nil {
		return StreamHeader{}, err
	}
	if h.Target.Port() == 0 || h.Target.Addr().IsUnspecified() {
		return StreamHeader{}, fmt.Errorf("%w: target %s is not a usable ip:port", ErrMalformed, h.Target)
	}
	return h, nil
}

// ReadStreamHeader reads a stream header from r. An unknown version is an
// error wrapping ErrVersion, so that a caller can answer StreamVersionErr.
func ReadStreamHeader(r io.Reader) (StreamHeader, error) {
	var pre [2]byte
	if _, err := io.ReadFull(r, pre[:]); err != nil {
		return StreamHeader{}, fmt.Errorf("read stream header: %w", err)
	}
	if pre[0] != StreamVersion {
		return StreamHeader{}, fmt.Errorf("%w: stream header version %d, this agent speaks %d", ErrVersion, pre[0], StreamVersion)
	}
	if int(pre[1]) > MaxStreamHeader {
		return StreamHeader{}, fmt.Errorf("%w: stream header of %d bytes, limit %d", ErrTooLarge, pre[1], MaxStreamHeader)
	}
	payload := make([]byte, pre[1])
	if _, err := io.ReadFull(r, payload); err != nil {
		return StreamHeader{}, fmt.Errorf("read stream header: %w", err)
	}
	return DecodeStreamHeader(payload)
}

// EncodeStreamStatus returns the bytes of s on the wire: code, message
// length, message.
func EncodeStreamStatus(s StreamStatus) []byte {
	msg := textclip.Clip(s.Message, MaxStatusMessage)
	b := make([]byte, 0, 2+len(msg))
	b = append(b, byte(s.Code), byte(len(msg)))
	return append(b, msg...)
}

// ReadStreamStatus reads the agent's status from r.
func ReadStreamStatus(r io.Reader) (StreamStatus, error) {
	var pre [2]byte
	if _, err := io.ReadFull(r, pre[:]); err != nil {
		return StreamStatus{}, fmt.Errorf("read stream status: %w", err)
	}
	s := StreamStatus{Code: StreamCode(pre[0])}
	if pre[1] > 0 {
		msg := make([]byte, pre[1])
		if _, err := io.ReadFull(r, msg); err != nil {
			return StreamStatus{}, fmt.Errorf("read stream status: %w", err)
		}
		s.Message = textclip.Clip(string(msg), MaxStatusMessage)
	}
	return s, nil
}

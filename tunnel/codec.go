package tunnel

import (
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"unicode/utf8"
)

// The encoder and decoder below give every value of the protocol exactly
// one encoding (SPEC.md): the decoder refuses short input, values over
// their limits, non-canonical addresses and, at the end, trailing bytes.

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

// Sizes of the preamble (magic and version) and of a frame header (type
// and length).
const (
	preambleSize    = 5
	frameHeaderSize = 5
)

// appendPreamble appends the magic and the version to b.
func appendPreamble(b []byte, version byte) []byte {
	return append(append(b, Magic[:]...), version)
}

// appendFrame appends one frame to b: type byte, big-endian uint32 length,
// payload.
func appendFrame(b []byte, typ byte, payload []byte) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// readPreamble reads the magic and returns the version the peer speaks.
func readPreamble(r io.Reader) (byte, error) {
	var p [preambleSize]byte
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
	if _, err := w.Write(appendFrame(make([]byte, 0, frameHeaderSize+len(payload)), typ, payload)); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}

// readFrame reads one frame, refusing a declared length above max before
// reading the payload.
func readFrame(r io.Reader, max int) (byte, []byte, error) {
	var h [frameHeaderSize]byte
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

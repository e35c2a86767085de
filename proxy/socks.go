package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"time"
)

// SOCKS5 constants (RFC 1928, RFC 1929).
const (
	socksVersion = 0x05

	methodNoAuth       = 0x00
	methodUserPass     = 0x02
	methodNoAcceptable = 0xff

	cmdConnect      = 0x01
	cmdBind         = 0x02
	cmdUDPAssociate = 0x03

	atypIPv4   = 0x01
	atypDomain = 0x03
	atypIPv6   = 0x04

	repSuccess             = 0x00
	repGeneralFailure      = 0x01
	repNotAllowed          = 0x02
	repHostUnreachable     = 0x04
	repConnectionRefused   = 0x05
	repCommandNotSupported = 0x07
	repAddrNotSupported    = 0x08
)

// errSOCKS is a protocol error with the reply code to send, if any.
type errSOCKS struct {
	rep byte // 0 = send no reply, just close
	msg string
}

func (e *errSOCKS) Error() string { return "socks5: " + e.msg }

// socksRequest is a parsed CONNECT (or other) request.
type socksRequest struct {
	cmd  byte
	host string // an IP literal or a domain name
	port uint16
}

// readGreeting reads the version/methods message and returns the methods.
func readGreeting(r io.Reader) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, &errSOCKS{msg: fmt.Sprintf("truncated greeting: %v", err)}
	}
	if hdr[0] != socksVersion {
		return nil, &errSOCKS{msg: fmt.Sprintf("version %d, want 5", hdr[0])}
	}
	if hdr[1] == 0 {
		return nil, &errSOCKS{msg: "greeting offers no method"}
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return nil, &errSOCKS{msg: fmt.Sprintf("truncated method list: %v", err)}
	}
	return methods, nil
}

// readUserPass reads an RFC 1929 sub-negotiation.
func readUserPass(r io.Reader) (user, pass string, err error) {
	var ver [1]byte
	if _, err := io.ReadFull(r, ver[:]); err != nil || ver[0] != 0x01 {
		return "", "", &errSOCKS{msg: "bad username/password sub-negotiation"}
	}
	readStr := func() (string, error) {
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return "", err
		}
		b := make([]byte, n[0])
		_, err := io.ReadFull(r, b)
		return string(b), err
	}
	if user, err = readStr(); err != nil {
		return "", "", &errSOCKS{msg: "truncated username"}
	}
	if pass, err = readStr(); err != nil {
		return "", "", &errSOCKS{msg: "truncated password"}
	}
	return user, pass, nil
}

// readRequest reads a request: VER CMD RSV ATYP DST.ADDR DST.PORT.
func readRequest(r io.Reader) (socksRequest, error) {
	var req socksRequest
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return req, &errSOCKS{msg: fmt.Sprintf("truncated request: %v", err)}
	}
	if hdr[0] != socksVersion {
		return req, &errSOCKS{rep: repGeneralFailure, msg: fmt.Sprintf("request version %d, want 5", hdr[0])}
	}
	req.cmd = hdr[1]
	switch hdr[3] {
	case atypIPv4:
		var b [4]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return req, &errSOCKS{msg: "truncated IPv4 address"}
		}
		req.host = netip.AddrFrom4(b).String()
	case atypIPv6:
		var b [16]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return req, &errSOCKS{msg: "truncated IPv6 address"}
		}
		req.host = netip.AddrFrom16(b).Unmap().String()
	case atypDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil || n[0] == 0 {
			return req, &errSOCKS{rep: repGeneralFailure, msg: "empty or truncated domain name"}
		}
		b := make([]byte, n[0])
		if _, err := io.ReadFull(r, b); err != nil {
			return req, &errSOCKS{msg: "truncated domain name"}
		}
		req.host = string(b)
	default:
		return req, &errSOCKS{rep: repAddrNotSupported, msg: fmt.Sprintf("address type %d", hdr[3])}
	}
	var port [2]byte
	if _, err := io.ReadFull(r, port[:]); err != nil {
		return req, &errSOCKS{msg: "truncated port"}
	}
	req.port = binary.BigEndian.Uint16(port[:])
	return req, nil
}

// reply writes a reply with a zero bound address.
func reply(w io.Writer, rep byte) error {
	_, err := w.Write([]byte{socksVersion, rep, 0x00, atypIPv4, 0, 0, 0, 0, 0, 0})
	return err
}

func (p *Proxy) serveSOCKS(ctx context.Context, ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("socks accept: %w", err)
		}
		go p.handleSOCKS(ctx, c)
	}
}

// handleSOCKS serves one SOCKS5 client: method negotiation (and
// username/password when configured), one CONNECT request, then the relay.
func (p *Proxy) handleSOCKS(ctx context.Context, c net.Conn) {
	result := "ok"
	defer func() { p.metrics.requests.WithLabelValues("socks5", result).Inc() }()
	// The whole negotiation has a deadline: a client that stalls half-way
	// costs one goroutine for at most this long.
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	if err := p.socksNegotiate(c, br); err != nil {
		result = p.socksRefuse(c, err)
		return
	}
	req, err := readRequest(br)
	if err != nil {
		result = p.socksRefuse(c, err)
		return
	}
	if req.cmd != cmdConnect {
		_ = reply(c, repCommandNotSupported)
		result = "unsupported_command"
		c.Close()
		return
	}
	up, err := p.socksConnect(ctx, req)
	if err != nil {
		rep := byte(repGeneralFailure)
		switch {
		case errors.Is(err, ErrNoRoute):
			rep, result = repNotAllowed, "no_route"
		case errors.Is(err, ErrForbidden):
			rep, result = repNotAllowed, "passthrough_forbidden"
		case errors.Is(err, ErrNoLiveBackend), errors.Is(err, ErrResolve):
			rep, result = repHostUnreachable, "unreachable"
		case errors.Is(err, ErrRefused):
			rep, result = repConnectionRefused, "refused"
		}
		_ = reply(c, rep)
		p.log.Info("socks5 connect failed", "client", c.RemoteAddr().String(), "target", net.JoinHostPort(req.host, fmt.Sprint(req.port)), "err", err)
		c.Close()
		return
	}
	if err := reply(c, repSuccess); err != nil {
		c.Close()
		up.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	p.splice(c, up, br)
}

// errUnauthorized is a client whose username and password were refused;
// the RFC 1929 answer has been sent.
var errUnauthorized = errors.New("socks5 authentication failed")

// errClientGone is a client that went away while we answered it.
var errClientGone = errors.New("client closed the connection")

// socksNegotiate picks the method the proxy requires and, for
// username/password, checks the client's credentials.
func (p *Proxy) socksNegotiate(c net.Conn, br *bufio.Reader) error {
	methods, err := readGreeting(br)
	if err != nil {
		return err
	}
	want := byte(methodNoAuth)
	if p.users != nil {
		want = methodUserPass
	}
	if !slices.Contains(methods, want) {
		_, _ = c.Write([]byte{socksVersion, methodNoAcceptable})
		return &errSOCKS{msg: fmt.Sprintf("client offers no acceptable method (need %#x)", want)}
	}
	if _, err := c.Write([]byte{socksVersion, want}); err != nil {
		return fmt.Errorf("%w: %w", errClientGone, err)
	}
	if want != methodUserPass {
		return nil
	}
	user, pass, err := readUserPass(br)
	if err != nil {
		return err
	}
	if !p.checkUser(user, pass) {
		_, _ = c.Write([]byte{0x01, 0x01})
		p.log.Info("socks5 authentication failed", "client", c.RemoteAddr().String(), "user", user)
		return errUnauthorized
	}
	if _, err := c.Write([]byte{0x01, 0x00}); err != nil {
		return fmt.Errorf("%w: %w", errClientGone, err)
	}
	return nil
}

// socksRefuse answers a failed negotiation or request (with a SOCKS reply
// where the error carries one), closes c, and returns the metrics result.
func (p *Proxy) socksRefuse(c net.Conn, err error) string {
	defer c.Close()
	switch {
	case errors.Is(err, errUnauthorized):
		return "unauthorized"
	case errors.Is(err, errClientGone):
		return "ok"
	}
	var se *errSOCKS
	if errors.As(err, &se) && se.rep != 0 {
		_ = reply(c, se.rep)
	}
	p.log.Info("socks5 request refused", "client", c.RemoteAddr().String(), "err", err)
	return "bad_request"
}

// socksConnect resolves the request's target and dials a backend for it.
func (p *Proxy) socksConnect(ctx context.Context, req socksRequest) (net.Conn, error) {
	targets, err := resolve(ctx, req.host, req.port)
	if err != nil {
		return nil, err
	}
	up, _, err := p.dial(ctx, targets)
	return up, err
}

package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/internal/textclip"
)

// The control channel (SPEC.md, "Control channel") is one stream per
// tunnel that the PS opens right after the Welcome. Its header carries
// ControlStreamVersion where a client stream carries StreamVersion, so an
// agent that predates it answers unsupported_version and closes it: the
// session then simply has no control channel. On it the agent sends
// requests (LostTunnel, Withdraw) and the PS answers each with an Ack; the
// PS may send one Bye before it closes the tunnel on purpose.

// ControlStreamVersion opens the control stream's header (version byte,
// zero length) instead of StreamVersion.
const ControlStreamVersion = 2

// MaxControlMessage bounds a control frame's payload: a LostTunnel of
// MaxEndpoints IPv6 routes takes 1.05 MB.
const MaxControlMessage = 2 << 20

// Control message types.
const (
	ctlLostTunnel byte = 1 // agent -> PS, request
	ctlWithdraw   byte = 2 // agent -> PS, request
	ctlAck        byte = 3 // PS -> agent, answers a request by id
	ctlBye        byte = 4 // PS -> agent, the PS closes the tunnel on purpose
	ctlPoolJoin   byte = 5 // agent -> PS, request
	ctlPoolGrant  byte = 6 // PS -> agent, answers a PoolJoin by id
)

// Errors of the control channel.
var (
	// ErrNoControl means the session has no control channel: the agent
	// predates it (it refused the control stream), or it is not open yet.
	ErrNoControl = errors.New("no control channel on this tunnel")
	// ErrControlStream is what Incoming.ReadHeader returns for the control
	// stream: the session took it over, the caller has nothing to serve.
	ErrControlStream = errors.New("control stream")
	// ErrControlClosed means the control channel ended before an answer.
	ErrControlClosed = errors.New("control channel closed")
	// ErrNoPool means the PS answered a PoolJoin with an Ack: it offers no
	// pooled data path (it predates it, or runs with --data-path mux), and
	// the agent uses the tunnel's streams only.
	ErrNoPool = errors.New("the ps offers no data connection pool")
)

// ControlMsg is one message of the control channel.
type ControlMsg interface{ controlType() byte }

// LostRoute is one backend a lost tunnel's PS had granted: the target and
// the PS port it was served on.
type LostRoute struct {
	Target netip.AddrPort
	Port   uint16
}

// LostTunnel reports that the agent's tunnel to PS PSID ended; Routes are
// the (target, port) pairs that PS granted in its Welcome.
type LostTunnel struct {
	ID     uint32
	PSID   string
	Routes []LostRoute
}

// Withdraw asks the PS to withdraw the session's routes now, keeping the
// session so the streams in flight finish (the agent is draining).
type Withdraw struct{ ID uint32 }

// Ack answers request ID: CodeOK, or why it was not done; Count is how
// many backends the request removed.
type Ack struct {
	ID     uint32
	Code   Code
	Count  uint32
	Reason string
}

// Bye tells the agent that the PS closes the tunnel on purpose (a newer
// session superseded it, the PS drains or stops): the tunnel is not lost,
// and the agent must not report it.
type Bye struct{ Reason string }

// PoolJoin asks the PS for a pool of data connections for this session
// (data.go); the PS answers with a PoolGrant, or an Ack when it offers none.
type PoolJoin struct{ ID uint32 }

// PoolGrant answers PoolJoin ID: Key names the session's pool, Addr is
// where the agent dials data connections, and Size is how many idle ones
// the PS keeps for the session at most (at least 1).
type PoolGrant struct {
	ID   uint32
	Key  PoolKey
	Addr netip.AddrPort
	Size uint16
}

// UnknownControl is a request of a type this version does not know; the
// PS answers it with CodeBadRequest (every request starts with its id).
type UnknownControl struct {
	Type byte
	ID   uint32
}

func (*LostTunnel) controlType() byte       { return ctlLostTunnel }
func (*Withdraw) controlType() byte         { return ctlWithdraw }
func (*Ack) controlType() byte              { return ctlAck }
func (*Bye) controlType() byte              { return ctlBye }
func (*PoolJoin) controlType() byte         { return ctlPoolJoin }
func (*PoolGrant) controlType() byte        { return ctlPoolGrant }
func (u *UnknownControl) controlType() byte { return u.Type }

// EncodeControl returns m as a whole frame: type, length, payload.
func EncodeControl(m ControlMsg) ([]byte, error) {
	var e encoder
	switch m := m.(type) {
	case *LostTunnel:
		if err := ident.Valid(m.PSID); err != nil {
			return nil, fmt.Errorf("encode lost tunnel: ps id: %w", err)
		}
		if len(m.Routes) > MaxEndpoints {
			return nil, fmt.Errorf("encode lost tunnel: %w: %d routes, limit %d", ErrTooLarge, len(m.Routes), MaxEndpoints)
		}
		e.b = make([]byte, 0, 16+len(m.PSID)+21*len(m.Routes))
		e.u32(m.ID)
		e.str(m.PSID)
		e.u32(uint32(len(m.Routes)))
		for _, r := range m.Routes {
			if !usableTarget(r.Target) || r.Port == 0 {
				return nil, fmt.Errorf("encode lost tunnel: route %s port %d is not usable", r.Target, r.Port)
			}
			e.addrPort(r.Target)
			e.u16(r.Port)
		}
	case *Withdraw:
		e.u32(m.ID)
	case *Ack:
		e.u32(m.ID)
		e.u16(uint16(m.Code))
		e.u32(m.Count)
		e.str(textclip.Clip(m.Reason, MaxReasonLen))
	case *Bye:
		e.str(textclip.Clip(m.Reason, MaxReasonLen))
	case *PoolJoin:
		e.u32(m.ID)
	case *PoolGrant:
		if !usableTarget(m.Addr) {
			return nil, fmt.Errorf("encode pool grant: dial address %s is not a usable ip:port", m.Addr)
		}
		if m.Size == 0 {
			return nil, errors.New("encode pool grant: size 0 (refuse the join with an ack instead)")
		}
		e.u32(m.ID)
		e.b = append(e.b, m.Key[:]...)
		e.addrPort(m.Addr)
		e.u16(m.Size)
	default:
		return nil, fmt.Errorf("encode control: message type %T cannot be sent", m)
	}
	if len(e.b) > MaxControlMessage {
		return nil, fmt.Errorf("encode control: %w: %d bytes, limit %d", ErrTooLarge, len(e.b), MaxControlMessage)
	}
	return appendFrame(make([]byte, 0, frameHeaderSize+len(e.b)), m.controlType(), e.b), nil
}

func usableTarget(t netip.AddrPort) bool {
	a := t.Addr()
	return t.IsValid() && t.Port() != 0 && !a.IsUnspecified() && !a.Is4In6() && a.Zone() == ""
}

// DecodeControl parses the payload of a control frame of type typ. A
// request of an unknown type decodes as *UnknownControl (its id is read,
// the rest ignored) so the PS can answer it.
func DecodeControl(typ byte, b []byte) (ControlMsg, error) {
	if len(b) > MaxControlMessage {
		return nil, fmt.Errorf("%w: control frame of %d bytes, limit %d", ErrTooLarge, len(b), MaxControlMessage)
	}
	d := decoder{b: b}
	var m ControlMsg
	switch typ {
	case ctlLostTunnel:
		lt := &LostTunnel{ID: d.u32("id"), PSID: d.str("ps id", MaxIDLen)}
		n := int(d.u32("route count"))
		if d.err == nil && (n > MaxEndpoints || n*9 > len(d.b)) { // 9 = smallest route
			d.fail("route count %d with %d bytes left", n, len(d.b))
		}
		if d.err == nil {
			lt.Routes = make([]LostRoute, 0, n)
		}
		for i := 0; i < n && d.err == nil; i++ {
			r := LostRoute{Target: d.addrPort("target", false), Port: d.u16("port")}
			if d.err == nil && (!usableTarget(r.Target) || r.Port == 0) {
				d.fail("route %d: target %s port %d is not usable", i, r.Target, r.Port)
			}
			lt.Routes = append(lt.Routes, r)
		}
		if d.err == nil {
			if err := ident.Valid(lt.PSID); err != nil {
				d.fail("ps id: %v", err)
			}
		}
		m = lt
	case ctlWithdraw:
		m = &Withdraw{ID: d.u32("id")}
	case ctlAck:
		a := &Ack{ID: d.u32("id"), Code: Code(d.u16("code")), Count: d.u32("count")}
		a.Reason = d.str("reason", MaxReasonLen)
		m = a
	case ctlBye:
		m = &Bye{Reason: d.str("reason", MaxReasonLen)}
	case ctlPoolJoin:
		m = &PoolJoin{ID: d.u32("id")}
	case ctlPoolGrant:
		g := &PoolGrant{ID: d.u32("id")}
		copy(g.Key[:], d.take(PoolKeySize, "pool key"))
		g.Addr = d.addrPort("dial address", false)
		g.Size = d.u16("size")
		if d.err == nil && !usableTarget(g.Addr) {
			d.fail("pool grant: dial address %s is not a usable ip:port", g.Addr)
		}
		if d.err == nil && g.Size == 0 {
			d.fail("pool grant: size 0")
		}
		m = g
	default:
		u := &UnknownControl{Type: typ, ID: d.u32("id")}
		d.b = nil // a newer peer's payload: only its id matters here
		m = u
	}
	if err := d.end("control message"); err != nil {
		return nil, err
	}
	return m, nil
}

// readControl reads one control frame.
func readControl(r io.Reader) (ControlMsg, error) {
	typ, body, err := readFrame(r, MaxControlMessage)
	if err != nil {
		return nil, err
	}
	return DecodeControl(typ, body)
}

// controlHeader is the control stream's header: version, zero length.
var controlHeader = []byte{ControlStreamVersion, 0}

// ---------------------------------------------------------------------
// Agent side.

// ControlClient is the agent's end of a control channel: it sends requests
// and waits for their acks. Safe for concurrent use.
type ControlClient struct {
	st  *yamux.Stream
	wmu sync.Mutex // one frame at a time on the stream

	mu      sync.Mutex
	next    uint32
	waiting map[uint32]chan ControlMsg // an *Ack, or a *PoolGrant for a PoolJoin
	bye     *Bye
	done    chan struct{} // closed when the read loop ends
}

func newControlClient(st *yamux.Stream) *ControlClient {
	c := &ControlClient{st: st, waiting: map[uint32]chan ControlMsg{}, done: make(chan struct{})}
	go c.readLoop()
	return c
}

// readLoop delivers answers (acks, grants) to their requests and records
// a Bye. Anything
// else from the PS breaks the protocol and ends the channel (not the
// tunnel: client streams are unaffected).
func (c *ControlClient) readLoop() {
	defer func() {
		_ = (&streamConn{Stream: c.st}).Close()
		c.mu.Lock()
		for id, ch := range c.waiting {
			close(ch)
			delete(c.waiting, id)
		}
		c.mu.Unlock()
		close(c.done)
	}()
	for {
		m, err := readControl(c.st)
		if err != nil {
			return
		}
		switch m := m.(type) {
		case *Ack:
			c.deliver(m.ID, m)
		case *PoolGrant:
			c.deliver(m.ID, m)
		case *Bye:
			c.mu.Lock()
			c.bye = m
			c.mu.Unlock()
		default:
			return
		}
	}
}

// deliver hands answer m to the request waiting for id, if any.
func (c *ControlClient) deliver(id uint32, m ControlMsg) {
	c.mu.Lock()
	ch := c.waiting[id]
	delete(c.waiting, id)
	c.mu.Unlock()
	if ch != nil {
		ch <- m
	}
}

// Bye returns the PS's Bye, if one arrived.
func (c *ControlClient) Bye() (*Bye, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bye, c.bye != nil
}

// Done is closed when the channel has ended.
func (c *ControlClient) Done() <-chan struct{} { return c.done }

// ReportLost sends a LostTunnel for psID's routes and waits for the ack
// (ctx bounds the wait).
func (c *ControlClient) ReportLost(ctx context.Context, psID string, routes []LostRoute) (*Ack, error) {
	return ackOf(c.request(ctx, func(id uint32) ControlMsg { return &LostTunnel{ID: id, PSID: psID, Routes: routes} }))
}

// Withdraw asks the PS to withdraw this session's routes and waits for
// the ack.
func (c *ControlClient) Withdraw(ctx context.Context) (*Ack, error) {
	return ackOf(c.request(ctx, func(id uint32) ControlMsg { return &Withdraw{ID: id} }))
}

// JoinPool asks the PS for a pool of data connections for this session and
// waits for its grant. A PS that offers none answers with an Ack: the
// error then wraps ErrNoPool and names the Ack's code and reason.
func (c *ControlClient) JoinPool(ctx context.Context) (*PoolGrant, error) {
	m, err := c.request(ctx, func(id uint32) ControlMsg { return &PoolJoin{ID: id} })
	if err != nil {
		return nil, err
	}
	switch m := m.(type) {
	case *PoolGrant:
		return m, nil
	case *Ack:
		return nil, fmt.Errorf("%w: ps answered %s: %s", ErrNoPool, m.Code, m.Reason)
	default:
		return nil, fmt.Errorf("%w: answer of type %d to a pool join", ErrMalformed, m.controlType())
	}
}

// ackOf returns the answer of a request that only an Ack may answer.
func ackOf(m ControlMsg, err error) (*Ack, error) {
	if err != nil {
		return nil, err
	}
	a, ok := m.(*Ack)
	if !ok {
		return nil, fmt.Errorf("%w: answer of type %d where an ack was due", ErrMalformed, m.controlType())
	}
	return a, nil
}

// request sends the request build makes with a fresh id and waits for the
// answer carrying that id.
func (c *ControlClient) request(ctx context.Context, build func(id uint32) ControlMsg) (ControlMsg, error) {
	ch := make(chan ControlMsg, 1)
	c.mu.Lock()
	select {
	case <-c.done:
		c.mu.Unlock()
		return nil, ErrControlClosed
	default:
	}
	c.next++
	id := c.next
	c.waiting[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.waiting, id)
		c.mu.Unlock()
	}
	frame, err := EncodeControl(build(id))
	if err != nil {
		forget()
		return nil, err
	}
	deadline := time.Now().Add(WriteTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.wmu.Lock()
	_ = c.st.SetWriteDeadline(deadline)
	_, err = c.st.Write(frame)
	_ = c.st.SetWriteDeadline(time.Time{})
	c.wmu.Unlock()
	if err != nil {
		forget()
		return nil, fmt.Errorf("send control request: %w", err)
	}
	select {
	case a, ok := <-ch:
		if !ok {
			return nil, ErrControlClosed
		}
		return a, nil
	case <-ctx.Done():
		forget()
		return nil, fmt.Errorf("wait for ack: %w", ctx.Err())
	}
}

// ---------------------------------------------------------------------
// PS side.

// ControlHandler serves the agent's requests on the PS. Each method
// returns the ack to send (its ID is filled in by the server).
type ControlHandler interface {
	LostTunnel(ctx context.Context, m *LostTunnel) Ack
	Withdraw(ctx context.Context) Ack
	// JoinPool returns the session's pool grant (its ID is filled in by
	// the server), or nil and the Ack that refuses the join (the PS
	// offers no pool: CodeUnavailable "data path is mux").
	JoinPool(ctx context.Context) (*PoolGrant, Ack)
}

// ControlServer is the PS's end of a control channel.
type ControlServer struct {
	st  *yamux.Stream
	wmu sync.Mutex
}

// OpenControl opens the session's control channel and waits (within
// timeout) for the agent's answer. An agent that refuses it (one that
// predates it) yields an error wrapping ErrNoControl: the tunnel works
// as before, without control messages.
func (s *PSSession) OpenControl(timeout time.Duration) (*ControlServer, error) {
	st, err := s.mux.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("open control stream: %w", err)
	}
	s.streams.add(st) // woken with the others when the session dies
	fail := func(err error) (*ControlServer, error) {
		_ = (&streamConn{Stream: st}).Close()
		return nil, err
	}
	_ = st.SetDeadline(time.Now().Add(timeout))
	if _, err := st.Write(controlHeader); err != nil {
		return fail(fmt.Errorf("send control header: %w", err))
	}
	status, err := ReadStreamStatus(st)
	if err != nil {
		return fail(fmt.Errorf("read control answer: %w", err))
	}
	if status.Code != StreamOK {
		return fail(fmt.Errorf("%w: agent answered %s: %s", ErrNoControl, status.Code, status.Message))
	}
	_ = st.SetDeadline(time.Time{})
	c := &ControlServer{st: st}
	s.ctlMu.Lock()
	s.control = c
	s.ctlMu.Unlock()
	return c, nil
}

// Serve answers the agent's requests with h until the channel or the
// tunnel ends. Requests are served one at a time, in order.
func (c *ControlServer) Serve(ctx context.Context, h ControlHandler) error {
	defer func() { _ = (&streamConn{Stream: c.st}).Close() }()
	for {
		m, err := readControl(c.st)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		var ack Ack
		var answer ControlMsg = &ack
		switch m := m.(type) {
		case *LostTunnel:
			ack = h.LostTunnel(ctx, m)
			ack.ID = m.ID
		case *Withdraw:
			ack = h.Withdraw(ctx)
			ack.ID = m.ID
		case *PoolJoin:
			g, refusal := h.JoinPool(ctx)
			if g != nil {
				g.ID = m.ID
				answer = g
				if _, err := EncodeControl(g); err != nil {
					// The PS's own mistake: refuse the join rather than end
					// the channel (the agent then uses the tunnel only).
					ack = Ack{ID: m.ID, Code: CodeInternal, Reason: err.Error()}
					answer = &ack
				}
			} else {
				ack = refusal
				ack.ID = m.ID
				if ack.Code == CodeOK {
					ack.Code = CodeUnavailable // an ack that grants nothing is a refusal
				}
			}
		case *UnknownControl:
			ack = Ack{ID: m.ID, Code: CodeBadRequest, Reason: fmt.Sprintf("unknown control message type %d", m.Type)}
		default:
			return fmt.Errorf("%w: control message type %d is not a request", ErrMalformed, m.controlType())
		}
		if err := c.send(answer, WriteTimeout); err != nil {
			return err
		}
	}
}

func (c *ControlServer) send(m ControlMsg, timeout time.Duration) error {
	frame, err := EncodeControl(m)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.st.SetWriteDeadline(time.Now().Add(timeout))
	_, err = c.st.Write(frame)
	_ = c.st.SetWriteDeadline(time.Time{})
	if err != nil {
		return fmt.Errorf("send control message: %w", err)
	}
	return nil
}

// byeTimeout bounds the Bye a PS sends before closing a tunnel: a stuck
// connection must not delay the close.
const byeTimeout = 200 * time.Millisecond

// sendBye tells the agent, best effort, that the PS closes the tunnel on
// purpose; it is sent once.
func (s *PSSession) sendBye(reason string) {
	s.ctlMu.Lock()
	c := s.control
	s.control = nil
	s.ctlMu.Unlock()
	if c != nil {
		_ = c.send(&Bye{Reason: reason}, byeTimeout)
	}
}

// takeControl answers the control stream's header and makes the stream the
// session's control channel. It returns ErrControlStream when it did, and
// another error (after refusing the stream) when the header is wrong or
// the session already has a channel.
func (in *Incoming) takeControl(pre [2]byte) error {
	s := in.sess
	if pre[1] != 0 {
		_ = in.Reject(StreamBadHeader, "control stream header must have length 0")
		return fmt.Errorf("%w: control stream header of length %d, want 0", ErrMalformed, pre[1])
	}
	s.ctlMu.Lock()
	defer s.ctlMu.Unlock()
	if s.control != nil {
		_ = in.Reject(StreamBadHeader, "this tunnel already has a control channel")
		return fmt.Errorf("%w: a second control stream", ErrMalformed)
	}
	_ = in.st.SetWriteDeadline(time.Now().Add(WriteTimeout))
	_, err := in.st.Write(EncodeStreamStatus(StreamStatus{Code: StreamOK}))
	_ = in.st.SetWriteDeadline(time.Time{})
	if err != nil {
		in.Abort()
		return fmt.Errorf("answer control stream: %w", err)
	}
	s.control = newControlClient(in.st)
	close(s.ctlReady)
	return ErrControlStream
}

// Control returns the session's control channel, or nil while the PS has
// not opened one (or never will: a PS that predates it).
func (s *AgentSession) Control() *ControlClient {
	s.ctlMu.Lock()
	defer s.ctlMu.Unlock()
	return s.control
}

// WaitControl waits until the PS opened the control channel and returns
// it. It returns nil when ctx ends first or the tunnel ends: a PS that
// predates the channel never opens it, so ctx should bound the wait. The
// session's streams must be accepted meanwhile (the channel arrives as
// one).
func (s *AgentSession) WaitControl(ctx context.Context) *ControlClient {
	select {
	case <-s.ctlReady:
		return s.Control()
	case <-ctx.Done():
	case <-s.Done():
	}
	return s.Control()
}

// ClosedByPS reports whether the PS said (Bye) that it closes the tunnel
// on purpose, and why. Call it once the session is done: it waits up to
// wait for the control channel to deliver what arrived before the end.
func (s *AgentSession) ClosedByPS(wait time.Duration) (string, bool) {
	c := s.Control()
	if c == nil {
		return "", false
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-c.Done():
	case <-t.C:
	}
	if b, ok := c.Bye(); ok {
		return b.Reason, true
	}
	return "", false
}

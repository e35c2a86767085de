package tunnel

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/tether-net/tether/internal/relay"
)

// ReadHello reads the preamble and the Hello from a connecting agent. The
// caller sets the handshake deadline on conn. Errors wrap ErrBadMagic,
// ErrVersion, ErrTooLarge or ErrMalformed for bad input, so the caller can
// refuse with the right code.
func ReadHello(r io.Reader) (*Hello, error) {
	v, err := readPreamble(r)
	if err != nil {
		return nil, err
	}
	if v != Version {
		return nil, fmt.Errorf("%w: agent speaks version %d, this ps speaks %d", ErrVersion, v, Version)
	}
	typ, body, err := readFrame(r, MaxMessageSize)
	if err != nil {
		return nil, err
	}
	if typ != msgHello {
		return nil, fmt.Errorf("%w: first message of type %d, want hello (%d)", ErrMalformed, typ, msgHello)
	}
	return DecodeHello(body)
}

// WriteWelcome sends w.
func WriteWelcome(w io.Writer, msg *Welcome) error {
	b, err := EncodeWelcome(msg)
	if err != nil {
		return err
	}
	return writeFrame(w, msgWelcome, b)
}

// WriteRefuse sends r.
func WriteRefuse(w io.Writer, r *Refuse) error { return writeFrame(w, msgRefuse, EncodeRefuse(r)) }

// RefuseCode maps an error from ReadHello to the refusal code to answer.
func RefuseCode(err error) Code {
	switch {
	case errors.Is(err, ErrVersion):
		return CodeVersion
	case errors.Is(err, ErrTooLarge):
		return CodeTooLarge
	default:
		return CodeBadRequest
	}
}

// PSSession is the PS's end of an established tunnel: the PS opens one
// stream per client connection, and the agent never opens any.
type PSSession struct {
	conn    net.Conn
	mux     *yamux.Session
	streams *streamSet

	// control is the session's control channel once OpenControl
	// succeeded; Close and GoAway send a Bye on it (control.go).
	ctlMu   sync.Mutex
	control *ControlServer
}

// PSOption changes how NewPSSession runs a session.
type PSOption func(*psOptions)

type psOptions struct {
	onAgentStream func()
	liveness      Liveness
}

// WithLiveness configures the watchdog that closes the session when the
// agent has sent nothing for l.DeadAfter (liveness.go); without it the
// defaults apply.
func WithLiveness(l Liveness) PSOption {
	return func(o *psOptions) { o.liveness = l }
}

// OnAgentStream makes f be called, once, when the session is closed
// because the agent opened a stream (so the PS can count the violation).
func OnAgentStream(f func()) PSOption {
	return func(o *psOptions) { o.onAgentStream = f }
}

// NewPSSession starts the multiplexer on conn after a Welcome was sent.
// log (may be nil) is the tunnel's logger.
//
// The protocol has only the PS open streams. Streams the agent opens would
// wait in yamux's accept backlog (1,024 of them) with a receive window
// each, hundreds of MB that nobody ever reads; so the first one closes the
// whole session at once: the agent is broken or hostile.
func NewPSSession(conn net.Conn, log *slog.Logger, window uint32, opts ...PSOption) (*PSSession, error) {
	var o psOptions
	for _, opt := range opts {
		opt(&o)
	}
	mux, streams, err := startSession(conn, o.liveness, log, func(c net.Conn) (*yamux.Session, error) {
		return yamux.Client(c, yamuxConfig(log, window))
	})
	if err != nil {
		return nil, fmt.Errorf("start session: %w", err)
	}
	s := &PSSession{conn: conn, mux: mux, streams: streams}
	go s.refuseAgentStreams(log, o.onAgentStream)
	return s, nil
}

// refuseAgentStreams waits for a stream opened by the agent and closes the
// session when one comes; it returns when the session ends.
func (s *PSSession) refuseAgentStreams(log *slog.Logger, onViolation func()) {
	st, err := s.mux.AcceptStream()
	if err != nil {
		return // the session ended
	}
	_ = s.mux.Close()
	if log != nil {
		log.Warn("closed the tunnel: the agent opened a stream towards the ps, which the protocol forbids", "stream_id", st.StreamID())
	}
	if onViolation != nil {
		onViolation()
	}
}

// Done is closed when the tunnel is gone.
func (s *PSSession) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close tears the tunnel down, telling an agent with a control channel
// first (Bye) that the tunnel is closed on purpose, not lost.
func (s *PSSession) Close() error {
	s.sendBye("tunnel closed by the ps")
	s.streams.wake()
	return s.mux.Close()
}

// GoAway tells the agent no new streams will come (and, through the
// control channel, that the tunnel ends on purpose).
func (s *PSSession) GoAway() error {
	s.sendBye("the ps sends no new streams on this tunnel")
	return s.mux.GoAway()
}

// NumStreams is the number of streams open on the tunnel.
func (s *PSSession) NumStreams() int { return s.mux.NumStreams() }

// Ping measures the round trip to the agent.
func (s *PSSession) Ping() (time.Duration, error) { return s.mux.Ping() }

// Open opens a stream for h within timeout and sends the header. The
// caller may write payload at once; the first Read on the returned stream
// consumes the agent's status and fails with a *StreamError if the agent
// refused (no payload ever follows a refusal).
func (s *PSSession) Open(h StreamHeader, timeout time.Duration) (relay.HalfCloser, error) {
	hdr, err := EncodeStreamHeader(h)
	if err != nil {
		return nil, err
	}
	// yamux's OpenStream has no context: run it aside and stop waiting at
	// the deadline, closing the stream if it arrives late.
	type result struct {
		st  *yamux.Stream
		err error
	}
	ch := make(chan result, 1)
	go func() {
		st, err := s.mux.OpenStream()
		ch <- result{st, err}
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var st *yamux.Stream
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("open stream: %w", r.err)
		}
		st = r.st
		s.streams.add(st)
	case <-timer.C:
		go func() {
			if r := <-ch; r.st != nil {
				_ = (&streamConn{Stream: r.st}).Close() // never added
			}
		}()
		return nil, fmt.Errorf("open stream: no answer within %v", timeout)
	}
	_ = st.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := st.Write(hdr); err != nil {
		_ = (&streamConn{Stream: st, set: s.streams}).Close()
		return nil, fmt.Errorf("send stream header: %w", err)
	}
	_ = st.SetWriteDeadline(time.Time{})
	return &outStream{streamConn: streamConn{Stream: st, set: s.streams}, statusTimeout: StatusTimeout}, nil
}

// StatusTimeout bounds the wait for the agent's stream status; the agent
// answers after its dial, which its own timeout bounds well below this.
const StatusTimeout = 30 * time.Second

// outStream reads the agent's status before the first payload byte.
type outStream struct {
	streamConn
	statusTimeout time.Duration
	statusDone    bool
}

func (o *outStream) Read(b []byte) (int, error) {
	if !o.statusDone {
		o.statusDone = true
		_ = o.Stream.SetReadDeadline(time.Now().Add(o.statusTimeout))
		st, err := ReadStreamStatus(o.Stream)
		if !o.closed.Load() {
			_ = o.Stream.SetReadDeadline(time.Time{})
		}
		if err != nil {
			return 0, err
		}
		if st.Code != StreamOK {
			return 0, &StreamError{st}
		}
	}
	return o.Stream.Read(b)
}

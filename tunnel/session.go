package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// ---- agent side ------------------------------------------------------------

// ClientConfig configures the agent's end of a handshake.
type ClientConfig struct {
	// TLS, when not nil, wraps the connection in TLS before the handshake.
	TLS *tls.Config
	// Timeout bounds the whole handshake (TLS included); default 10 s.
	Timeout time.Duration
	// Window is the per-stream receive window; 0 = DefaultStreamWindow.
	Window uint32
	// Logger receives yamux's debug lines; nil discards them.
	Logger *slog.Logger
}

// AgentSession is the agent's end of an established tunnel: the PS opens
// streams on it, the agent accepts them.
type AgentSession struct {
	Welcome *Welcome
	conn    net.Conn
	mux     *yamux.Session
}

// Handshake runs the agent's side of the handshake on conn (which it owns
// from then on, and closes on failure): TLS if configured, the preamble and
// the Hello, then the PS's Welcome or Refuse. A Refuse comes back as a
// *Refuse error (errors.Is(err, ErrRefused)).
func Handshake(ctx context.Context, conn net.Conn, hello *Hello, cfg ClientConfig) (*AgentSession, error) {
	s, err := handshake(ctx, conn, hello, cfg)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return s, nil
}

func handshake(ctx context.Context, conn net.Conn, hello *Hello, cfg ClientConfig) (*AgentSession, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	payload, err := EncodeHello(hello)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	// The context can end the handshake early: closing the connection
	// unblocks every read and write on it.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if cfg.TLS != nil {
		tc := tls.Client(conn, cfg.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("tls handshake with %s: %w", conn.RemoteAddr(), err)
		}
		conn = tc
	}
	// Preamble and Hello in one write: one segment for small hellos.
	buf := make([]byte, 0, 10+len(payload))
	buf = append(buf, Magic[:]...)
	buf = append(buf, Version, msgHello, 0, 0, 0, 0)
	putUint32(buf[6:10], uint32(len(payload)))
	buf = append(buf, payload...)
	if _, err := conn.Write(buf); err != nil {
		return nil, fmt.Errorf("send hello: %w", ctxErr(ctx, err))
	}
	typ, body, err := readFrame(conn, MaxMessageSize)
	if err != nil {
		return nil, fmt.Errorf("read answer: %w", ctxErr(ctx, err))
	}
	switch typ {
	case msgRefuse:
		r, err := DecodeRefuse(body)
		if err != nil {
			return nil, fmt.Errorf("decode refuse: %w", err)
		}
		return nil, r
	case msgWelcome:
	default:
		return nil, fmt.Errorf("%w: answer of type %d, want welcome or refuse", ErrMalformed, typ)
	}
	w, err := DecodeWelcome(body)
	if err != nil {
		return nil, fmt.Errorf("decode welcome: %w", err)
	}
	if len(w.Endpoints) != len(hello.Endpoints) {
		return nil, fmt.Errorf("%w: welcome answers %d endpoints, hello had %d", ErrMalformed, len(w.Endpoints), len(hello.Endpoints))
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	mux, err := yamux.Server(newCoalescingConn(conn), yamuxConfig(cfg.Logger, cfg.Window))
	if err != nil {
		return nil, fmt.Errorf("start session: %w", err)
	}
	return &AgentSession{Welcome: w, conn: conn, mux: mux}, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

func putUint32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}

// Accept waits for the PS to open a stream. It returns ErrSessionClosed
// once the tunnel is gone.
func (s *AgentSession) Accept(ctx context.Context) (*Incoming, error) {
	st, err := s.mux.AcceptStreamWithContext(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w: %w", ErrSessionClosed, err)
	}
	return &Incoming{st: st}, nil
}

// Done is closed when the tunnel is gone.
func (s *AgentSession) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close tears the tunnel down.
func (s *AgentSession) Close() error { return s.mux.Close() }

// NumStreams is the number of streams open on the tunnel.
func (s *AgentSession) NumStreams() int { return s.mux.NumStreams() }

// RemoteAddr is the PS's address.
func (s *AgentSession) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// Incoming is a stream the PS opened, before the agent has answered it.
type Incoming struct{ st *yamux.Stream }

// ReadHeader reads the stream header, waiting at most timeout.
func (in *Incoming) ReadHeader(timeout time.Duration) (StreamHeader, error) {
	_ = in.st.SetReadDeadline(time.Now().Add(timeout))
	h, err := ReadStreamHeader(in.st)
	_ = in.st.SetReadDeadline(time.Time{})
	return h, err
}

// Reject answers the stream with a refusal and closes it.
func (in *Incoming) Reject(code StreamCode, msg string) error {
	_ = in.st.SetWriteDeadline(time.Now().Add(WriteTimeout))
	_, err := in.st.Write(EncodeStreamStatus(StreamStatus{Code: code, Message: msg}))
	c := &streamConn{Stream: in.st}
	_ = c.Close()
	if err != nil {
		return fmt.Errorf("send stream status: %w", err)
	}
	return nil
}

// Accept answers the stream with StreamOK and returns it for copying.
func (in *Incoming) Accept() (HalfCloser, error) {
	if _, err := in.st.Write(EncodeStreamStatus(StreamStatus{Code: StreamOK})); err != nil {
		c := &streamConn{Stream: in.st}
		_ = c.Close()
		return nil, fmt.Errorf("send stream status: %w", err)
	}
	return &streamConn{Stream: in.st}, nil
}

// Abort closes the stream without an answer.
func (in *Incoming) Abort() { c := &streamConn{Stream: in.st}; _ = c.Close() }

// ErrSessionClosed means the tunnel is gone.
var ErrSessionClosed = errors.New("tunnel session closed")

// streamConn adapts a yamux stream to HalfCloser: in yamux, Close sends a
// FIN and leaves reading open, which is exactly CloseWrite; our Close also
// unblocks local readers and writers at once.
type streamConn struct {
	*yamux.Stream
	closed atomic.Bool
}

func (s *streamConn) CloseWrite() error { return s.Stream.Close() }

func (s *streamConn) Close() error {
	s.closed.Store(true)
	err := s.Stream.Close()
	_ = s.Stream.SetDeadline(time.Unix(1, 0))
	return err
}

// ---- PS side ---------------------------------------------------------------

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
// stream per client connection.
type PSSession struct {
	conn net.Conn
	mux  *yamux.Session
}

// NewPSSession starts the multiplexer on conn after a Welcome was sent.
func NewPSSession(conn net.Conn, log *slog.Logger, window uint32) (*PSSession, error) {
	mux, err := yamux.Client(newCoalescingConn(conn), yamuxConfig(log, window))
	if err != nil {
		return nil, fmt.Errorf("start session: %w", err)
	}
	return &PSSession{conn: conn, mux: mux}, nil
}

// Done is closed when the tunnel is gone.
func (s *PSSession) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close tears the tunnel down.
func (s *PSSession) Close() error { return s.mux.Close() }

// GoAway tells the agent no new streams will come.
func (s *PSSession) GoAway() error { return s.mux.GoAway() }

// NumStreams is the number of streams open on the tunnel.
func (s *PSSession) NumStreams() int { return s.mux.NumStreams() }

// Ping measures the round trip to the agent.
func (s *PSSession) Ping() (time.Duration, error) { return s.mux.Ping() }

// Open opens a stream for h within timeout and sends the header. The
// caller may write payload at once; the first Read on the returned stream
// consumes the agent's status and fails with a *StreamError if the agent
// refused (no payload ever follows a refusal).
func (s *PSSession) Open(h StreamHeader, timeout time.Duration) (HalfCloser, error) {
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
	case <-timer.C:
		go func() {
			if r := <-ch; r.st != nil {
				_ = (&streamConn{Stream: r.st}).Close()
			}
		}()
		return nil, fmt.Errorf("open stream: no answer within %v", timeout)
	}
	_ = st.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := st.Write(hdr); err != nil {
		_ = (&streamConn{Stream: st}).Close()
		return nil, fmt.Errorf("send stream header: %w", err)
	}
	_ = st.SetWriteDeadline(time.Time{})
	return &outStream{streamConn: streamConn{Stream: st}, statusTimeout: StatusTimeout}, nil
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

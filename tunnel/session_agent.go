package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/tether-net/tether/internal/relay"
)

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
	// Liveness configures the watchdog that closes the session when the
	// PS has sent nothing for Liveness.DeadAfter (liveness.go).
	Liveness Liveness
	// DisableControl makes the session refuse the PS's control stream as
	// an agent that predates it does (tests of that compatibility).
	DisableControl bool
}

// AgentSession is the agent's end of an established tunnel: the PS opens
// streams on it, the agent accepts them.
type AgentSession struct {
	Welcome *Welcome
	conn    net.Conn
	mux     *yamux.Session
	streams *streamSet
	tls     *tls.Config // as the handshake used it; data connections use it too

	// The control channel, once the PS opened it (control.go); ctlReady
	// is closed then.
	noControl bool
	ctlMu     sync.Mutex
	control   *ControlClient
	ctlReady  chan struct{}
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
		tc := tls.Client(BatchRecords(conn), cfg.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("tls handshake with %s: %w", conn.RemoteAddr(), err)
		}
		conn = tc
	}
	// Preamble and Hello in one write: one segment for small hellos.
	buf := appendFrame(appendPreamble(make([]byte, 0, preambleSize+frameHeaderSize+len(payload)), Version), msgHello, payload)
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
	mux, streams, err := startSession(conn, cfg.Liveness, cfg.Logger, func(c net.Conn) (*yamux.Session, error) {
		return yamux.Server(c, yamuxConfig(cfg.Logger, cfg.Window))
	})
	if err != nil {
		return nil, fmt.Errorf("start session: %w", err)
	}
	return &AgentSession{Welcome: w, conn: conn, mux: mux, streams: streams, tls: cfg.TLS,
		noControl: cfg.DisableControl, ctlReady: make(chan struct{})}, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
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
	s.streams.add(st)
	return &Incoming{st: st, sess: s}, nil
}

// Done is closed when the tunnel is gone.
func (s *AgentSession) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close tears the tunnel down.
func (s *AgentSession) Close() error {
	s.streams.wake()
	return s.mux.Close()
}

// NumStreams is the number of streams open on the tunnel.
func (s *AgentSession) NumStreams() int { return s.mux.NumStreams() }

// RemoteAddr is the PS's address.
func (s *AgentSession) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// TLSConfig is the TLS configuration the tunnel was made with (nil for
// plain TCP): data connections to the same PS use it, so they present the
// same client certificate and verify the same server name.
func (s *AgentSession) TLSConfig() *tls.Config { return s.tls }

// Incoming is a stream the PS opened, before the agent has answered it.
type Incoming struct {
	st   *yamux.Stream
	sess *AgentSession
}

// ReadHeader reads the stream header, waiting at most timeout. The
// control stream is taken over by the session (control.go): ReadHeader
// then returns ErrControlStream and the caller has nothing to serve.
func (in *Incoming) ReadHeader(timeout time.Duration) (StreamHeader, error) {
	_ = in.st.SetReadDeadline(time.Now().Add(timeout))
	var pre [2]byte
	if _, err := io.ReadFull(in.st, pre[:]); err != nil {
		_ = in.st.SetReadDeadline(time.Time{})
		return StreamHeader{}, fmt.Errorf("read stream header: %w", err)
	}
	if pre[0] == ControlStreamVersion && !in.sess.noControl {
		_ = in.st.SetReadDeadline(time.Time{})
		return StreamHeader{}, in.takeControl(pre)
	}
	h, err := ReadStreamHeader(io.MultiReader(bytes.NewReader(pre[:]), in.st))
	_ = in.st.SetReadDeadline(time.Time{})
	return h, err
}

// Reject answers the stream with a refusal and closes it.
func (in *Incoming) Reject(code StreamCode, msg string) error {
	_ = in.st.SetWriteDeadline(time.Now().Add(WriteTimeout))
	_, err := in.st.Write(EncodeStreamStatus(StreamStatus{Code: code, Message: msg}))
	c := &streamConn{Stream: in.st, set: in.sess.streams}
	_ = c.Close()
	if err != nil {
		return fmt.Errorf("send stream status: %w", err)
	}
	return nil
}

// Accept answers the stream with StreamOK and returns it for copying.
func (in *Incoming) Accept() (relay.HalfCloser, error) {
	if _, err := in.st.Write(EncodeStreamStatus(StreamStatus{Code: StreamOK})); err != nil {
		c := &streamConn{Stream: in.st, set: in.sess.streams}
		_ = c.Close()
		return nil, fmt.Errorf("send stream status: %w", err)
	}
	return &streamConn{Stream: in.st, set: in.sess.streams}, nil
}

// Abort closes the stream without an answer.
func (in *Incoming) Abort() { c := &streamConn{Stream: in.st, set: in.sess.streams}; _ = c.Close() }

package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Data connections (SPEC.md, "Data connections") are the pooled data path:
// besides its tunnel, an agent keeps a few dedicated TCP (TLS) connections
// to the PS, each opened with the session's pool key. The PS pairs one
// client connection with one idle data connection by writing a stream
// header on it; the agent answers with a stream status, then both ends move
// raw bytes, with a kernel splice where both sides are plain TCP. A data
// connection carries one client connection and is then closed.

// DataMagic opens every data connection, before DataVersion and the key.
var DataMagic = [4]byte{'T', 'T', 'H', 'D'}

// DataVersion is the version of the data connection's opening.
const DataVersion = 1

// PoolKeySize is the size of a PoolKey on the wire.
const PoolKeySize = 32

// dataOpeningSize is magic, version and key.
const dataOpeningSize = len(DataMagic) + 1 + PoolKeySize

// ErrDataIdleEnded is what DataConn.ReadHeader returns when the
// connection ended before the PS paired it with a client (the PS closed
// it, the tunnel session ended, Close was called): there is no client to
// answer, only a pool slot to refill.
var ErrDataIdleEnded = errors.New("data connection ended while idle")

// DataKeepAlive is the TCP keepalive period of data connections on both
// ends: an idle data connection may wait for a client for hours, and a
// vanished peer must not leave it in the pool forever.
const DataKeepAlive = 15 * time.Second

// PoolKey names one tunnel session's pool on the PS. It is a secret of the
// session: whoever knows it can offer data connections to the session, so
// it is random (crypto/rand) and sent only over the control channel.
type PoolKey [PoolKeySize]byte

// NewPoolKey returns a random key.
func NewPoolKey() (PoolKey, error) {
	var k PoolKey
	if _, err := rand.Read(k[:]); err != nil {
		return PoolKey{}, fmt.Errorf("pool key: %w", err)
	}
	return k, nil
}

// String shows a prefix of the key only, enough to tell keys apart in a
// log without revealing the secret.
func (k PoolKey) String() string { return fmt.Sprintf("%x…", k[:4]) }

// appendDataOpening appends the opening of a data connection to b.
func appendDataOpening(b []byte, key PoolKey) []byte {
	b = append(b, DataMagic[:]...)
	b = append(b, DataVersion)
	return append(b, key[:]...)
}

// ---------------------------------------------------------------------
// PS side.

// ReadDataOpening reads the opening of a data connection: magic, version,
// key. A wrong magic is an error wrapping ErrBadMagic; an unknown version
// wraps ErrVersion (answer StreamVersionErr) and is reported before the
// key is read, since a newer opening may be laid out differently.
func ReadDataOpening(r io.Reader) (PoolKey, error) {
	var pre [len(DataMagic) + 1]byte
	if _, err := io.ReadFull(r, pre[:]); err != nil {
		return PoolKey{}, fmt.Errorf("read data connection opening: %w", err)
	}
	if [4]byte(pre[:4]) != DataMagic {
		return PoolKey{}, fmt.Errorf("%w: data connection opens with %q, want %q", ErrBadMagic, pre[:4], DataMagic[:])
	}
	if pre[4] != DataVersion {
		return PoolKey{}, fmt.Errorf("%w: data connection version %d, this side speaks %d", ErrVersion, pre[4], DataVersion)
	}
	var k PoolKey
	if _, err := io.ReadFull(r, k[:]); err != nil {
		return PoolKey{}, fmt.Errorf("read data connection key: %w", err)
	}
	return k, nil
}

// AnswerData writes the PS's answer to a data connection's opening:
// StreamOK when it joined the pool, or a refusal (StreamPoolRefused,
// StreamVersionErr) after which the PS closes the connection.
func AnswerData(w io.Writer, st StreamStatus) error {
	if _, err := w.Write(EncodeStreamStatus(st)); err != nil {
		return fmt.Errorf("answer data connection: %w", err)
	}
	return nil
}

// OpenData pairs the idle data connection c with a client connection: it
// writes h and waits at most timeout for the agent's status. It returns nil
// when the agent accepted (the caller then copies bytes over c), a
// *StreamError when it refused, and another error when c is dead (the
// agent restarted, the connection went stale): the caller may then try
// another data connection, since no client byte was sent. The deadline is
// cleared on success.
func OpenData(c net.Conn, h StreamHeader, timeout time.Duration) error {
	hdr, err := EncodeStreamHeader(h)
	if err != nil {
		return err
	}
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("open data connection: %w", err)
	}
	if _, err := c.Write(hdr); err != nil {
		return fmt.Errorf("send stream header on data connection: %w", err)
	}
	st, err := ReadStreamStatus(c)
	if err != nil {
		return fmt.Errorf("data connection: %w", err)
	}
	if st.Code != StreamOK {
		return &StreamError{StreamStatus: st}
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("open data connection: %w", err)
	}
	return nil
}

// ---------------------------------------------------------------------
// Agent side.

// DataConn is the agent's end of a data connection: idle until the PS
// pairs it with a client connection (ReadHeader returns), then answered
// with Reject or Accept like a yamux stream.
type DataConn struct {
	conn  net.Conn     // the TLS connection, or tcp
	tcp   *net.TCPConn // the socket underneath
	close sync.Once
}

// DialData dials a data connection to the PS's pool listener at addr, with
// TLS when cfg.TLS is set (the same configuration as the tunnel, client
// certificate included), sends the opening with key and reads the PS's
// answer; cfg.Timeout (default 10 s) and ctx bound all of it. A refusal is
// a *StreamError (errors.Is(err, ErrRefused)); StreamPoolRefused means the
// PS does not know the key (the session is gone) or the pool is full.
func DialData(ctx context.Context, addr netip.AddrPort, key PoolKey, cfg ClientConfig) (*DataConn, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	d := net.Dialer{KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: DataKeepAlive, Interval: DataKeepAlive, Count: 3}}
	raw, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("dial data connection: %w", err)
	}
	dc := &DataConn{conn: raw, tcp: raw.(*net.TCPConn)}
	if err := dc.open(ctx, key, cfg); err != nil {
		_ = raw.Close()
		return nil, err
	}
	return dc, nil
}

func (dc *DataConn) open(ctx context.Context, key PoolKey, cfg ClientConfig) error {
	deadline, _ := ctx.Deadline()
	if err := dc.tcp.SetDeadline(deadline); err != nil {
		return fmt.Errorf("data connection: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = dc.tcp.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if cfg.TLS != nil {
		tc := tls.Client(dc.tcp, cfg.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("tls handshake on data connection to %s: %w", dc.tcp.RemoteAddr(), err)
		}
		dc.conn = tc
	}
	if _, err := dc.conn.Write(appendDataOpening(make([]byte, 0, dataOpeningSize), key)); err != nil {
		return fmt.Errorf("send data connection opening: %w", ctxErr(ctx, err))
	}
	st, err := ReadStreamStatus(dc.conn)
	if err != nil {
		return fmt.Errorf("data connection answer: %w", ctxErr(ctx, err))
	}
	if st.Code != StreamOK {
		return &StreamError{StreamStatus: st}
	}
	if !stop() {
		return fmt.Errorf("data connection: %w", ctx.Err())
	}
	if err := dc.tcp.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("data connection: %w", err)
	}
	return nil
}

// ReadHeader waits, without a deadline, until the PS pairs the connection
// with a client and sends the stream header; once its first byte arrived,
// the rest must follow within WriteTimeout. It fails with an error
// wrapping ErrDataIdleEnded when the connection ends first. An unknown
// header version wraps ErrVersion (answer
// StreamVersionErr), anything else that does not decode wraps ErrMalformed
// or ErrTooLarge (answer StreamBadHeader).
func (dc *DataConn) ReadHeader() (StreamHeader, error) {
	var first [1]byte
	if _, err := io.ReadFull(dc.conn, first[:]); err != nil {
		return StreamHeader{}, fmt.Errorf("%w: %w", ErrDataIdleEnded, err)
	}
	_ = dc.conn.SetReadDeadline(time.Now().Add(WriteTimeout))
	h, err := ReadStreamHeader(io.MultiReader(bytes.NewReader(first[:]), dc.conn))
	_ = dc.conn.SetReadDeadline(time.Time{})
	return h, err
}

// Reject answers the paired client connection with a refusal and closes
// the data connection.
func (dc *DataConn) Reject(code StreamCode, msg string) error {
	_ = dc.conn.SetWriteDeadline(time.Now().Add(WriteTimeout))
	_, err := dc.conn.Write(EncodeStreamStatus(StreamStatus{Code: code, Message: msg}))
	_ = dc.Close()
	if err != nil {
		return fmt.Errorf("send stream status on data connection: %w", err)
	}
	return nil
}

// Accept answers StreamOK and returns the connection for copying: the
// *net.TCPConn itself on plain TCP (so relay.Splice can splice it in the
// kernel), the *tls.Conn under TLS. Both half-close with CloseWrite. The
// caller owns it from then on.
func (dc *DataConn) Accept() (net.Conn, error) {
	_ = dc.conn.SetWriteDeadline(time.Now().Add(WriteTimeout))
	_, err := dc.conn.Write(EncodeStreamStatus(StreamStatus{Code: StreamOK}))
	_ = dc.conn.SetWriteDeadline(time.Time{})
	if err != nil {
		_ = dc.Close()
		return nil, fmt.Errorf("send stream status on data connection: %w", err)
	}
	return dc.conn, nil
}

// Close closes the data connection; a ReadHeader in progress returns.
// Closing the TCP socket directly (not the TLS layer) never blocks on a
// close_notify to a peer that stopped reading.
func (dc *DataConn) Close() error {
	var err error
	dc.close.Do(func() { err = dc.tcp.Close() })
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// LocalAddr is the agent's end of the data connection.
func (dc *DataConn) LocalAddr() net.Addr { return dc.tcp.LocalAddr() }

// RemoteAddr is the PS's pool listener.
func (dc *DataConn) RemoteAddr() net.Addr { return dc.tcp.RemoteAddr() }

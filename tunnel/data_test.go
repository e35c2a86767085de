package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testpki"
)

func TestDataOpeningRoundTripsAndRejectsBadInput(t *testing.T) {
	key, err := NewPoolKey()
	if err != nil {
		t.Fatal(err)
	}
	other, _ := NewPoolKey()
	if key == (PoolKey{}) || key == other {
		t.Fatalf("NewPoolKey gave %x and %x: not random", key, other)
	}
	opening := appendDataOpening(nil, key)
	if len(opening) != dataOpeningSize {
		t.Fatalf("opening of %d bytes, want %d", len(opening), dataOpeningSize)
	}
	got, err := ReadDataOpening(bytes.NewReader(opening))
	if err != nil || got != key {
		t.Fatalf("round trip: got %x, %v; want %x", got, err, key)
	}

	tunnelMagic := append(append([]byte{}, Magic[:]...), opening[4:]...)
	badVersion := append([]byte{}, opening...)
	badVersion[4] = DataVersion + 1
	for name, tc := range map[string]struct {
		b    []byte
		want error
	}{
		"tunnel magic":  {tunnelMagic, ErrBadMagic},
		"garbage":       {[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n----------"), ErrBadMagic},
		"bad version":   {badVersion, ErrVersion},
		"short key":     {opening[:len(opening)-1], io.ErrUnexpectedEOF},
		"short magic":   {opening[:3], io.ErrUnexpectedEOF},
		"empty":         {nil, io.EOF},
		"version alone": {opening[:5], io.EOF},
	} {
		if _, err := ReadDataOpening(bytes.NewReader(tc.b)); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", name, err, tc.want)
		}
	}
	// A bad version is reported before the key is read: a newer opening
	// may be laid out differently, and the PS must answer it at once.
	if _, err := ReadDataOpening(bytes.NewReader(badVersion[:5])); !errors.Is(err, ErrVersion) {
		t.Errorf("bad version without a key: got %v, want ErrVersion", err)
	}
	if s := key.String(); len(s) > 12 {
		t.Errorf("PoolKey.String shows %q: the secret must not reach logs", s)
	}
}

// fakePoolPS is a pool listener as the PS runs it: it reads each data
// connection's opening, answers it (ok for key, the refusal otherwise) and
// hands accepted ones over.
type fakePoolPS struct {
	addr     netip.AddrPort
	key      PoolKey
	accepted chan net.Conn
	peerCert chan string // the client certificate's common name, under TLS
}

func startFakePoolPS(t *testing.T, key PoolKey, srvTLS *tls.Config) *fakePoolPS {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	ps := &fakePoolPS{addr: ln.Addr().(*net.TCPAddr).AddrPort(), key: key,
		accepted: make(chan net.Conn, 16), peerCert: make(chan string, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = c.Close() })
			go func() {
				if srvTLS != nil {
					tc := tls.Server(c, srvTLS)
					if err := tc.Handshake(); err != nil {
						_ = c.Close()
						return
					}
					if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
						ps.peerCert <- certs[0].Subject.CommonName
					}
					c = tc
				}
				_ = c.SetDeadline(time.Now().Add(2 * time.Second))
				k, err := ReadDataOpening(c)
				switch {
				case errors.Is(err, ErrVersion):
					_ = AnswerData(c, StreamStatus{Code: StreamVersionErr, Message: err.Error()})
				case err != nil:
					_ = c.Close()
					return
				case k != ps.key:
					_ = AnswerData(c, StreamStatus{Code: StreamPoolRefused, Message: "unknown pool key"})
				default:
					_ = c.SetDeadline(time.Time{})
					if AnswerData(c, StreamStatus{Code: StreamOK}) == nil {
						ps.accepted <- c
						return
					}
				}
				_ = c.Close()
			}()
		}
	}()
	return ps
}

func (ps *fakePoolPS) next(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-ps.accepted:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("the PS got no data connection")
		return nil
	}
}

// TestDataConnectionCarriesOneClient runs a data connection on plain TCP
// and on TLS with a client certificate: the opening is accepted, the PS
// pairs it with a header the agent reads, the agent accepts, and bytes
// move both ways with half-close.
func TestDataConnectionCarriesOneClient(t *testing.T) {
	pki := testpki.NewPKI(t)
	srvTLS, err := ServerTLSConfig(TLSFiles{Cert: pki.ServerCert, Key: pki.ServerKey, CA: pki.CA})
	if err != nil {
		t.Fatal(err)
	}
	cliTLS, err := ClientTLSConfig(TLSFiles{Cert: pki.ClientCert, Key: pki.ClientKey, CA: pki.CA}, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		srv, cli *tls.Config
	}{{"tcp", nil, nil}, {"tls", srvTLS, cliTLS}} {
		t.Run(tc.name, func(t *testing.T) {
			key, _ := NewPoolKey()
			ps := startFakePoolPS(t, key, tc.srv)
			dc, err := DialData(context.Background(), ps.addr, key, ClientConfig{TLS: tc.cli, Timeout: 5 * time.Second})
			if err != nil {
				t.Fatalf("dial data: %v", err)
			}
			defer dc.Close()
			psEnd := ps.next(t)
			if tc.srv != nil {
				if cn := <-ps.peerCert; cn == "" {
					t.Error("the data connection presented no client certificate")
				}
			}
			h := StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100"), Source: netip.MustParseAddrPort("[2001:db8::9]:40000")}
			opened := make(chan error, 1)
			go func() { opened <- OpenData(psEnd, h, 2*time.Second) }()
			got, err := dc.ReadHeader()
			if err != nil || got != h {
				t.Fatalf("ReadHeader: %+v, %v; want %+v", got, err, h)
			}
			select {
			case err := <-opened:
				t.Fatalf("OpenData returned %v before the agent answered", err)
			case <-time.After(50 * time.Millisecond):
			}
			conn, err := dc.Accept()
			if err != nil {
				t.Fatal(err)
			}
			if err := <-opened; err != nil {
				t.Fatalf("OpenData after accept: %v", err)
			}
			_, isTCP := conn.(*net.TCPConn)
			if isTCP != (tc.srv == nil) {
				t.Errorf("Accept gave %T: plain TCP must be a *net.TCPConn for the kernel splice", conn)
			}
			if _, ok := conn.(interface{ CloseWrite() error }); !ok {
				t.Errorf("Accept gave %T, which cannot half-close", conn)
			}
			// PS -> agent, then half-close; the other way still flows.
			if _, err := psEnd.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			_ = psEnd.(interface{ CloseWrite() error }).CloseWrite()
			b, err := io.ReadAll(conn)
			if err != nil || string(b) != "ping" {
				t.Fatalf("agent read %q, %v", b, err)
			}
			if _, err := conn.Write([]byte("pong")); err != nil {
				t.Fatal(err)
			}
			_ = conn.(interface{ CloseWrite() error }).CloseWrite()
			b, err = io.ReadAll(psEnd)
			if err != nil || string(b) != "pong" {
				t.Fatalf("PS read %q, %v", b, err)
			}
		})
	}
}

func TestDataConnectionRefusals(t *testing.T) {
	key, _ := NewPoolKey()
	ps := startFakePoolPS(t, key, nil)
	ctx := context.Background()
	cfg := ClientConfig{Timeout: 2 * time.Second}

	t.Run("unknown key", func(t *testing.T) {
		wrong, _ := NewPoolKey()
		_, err := DialData(ctx, ps.addr, wrong, cfg)
		var se *StreamError
		if !errors.As(err, &se) || se.Code != StreamPoolRefused || !errors.Is(err, ErrRefused) {
			t.Fatalf("a wrong key: got %v, want a pool_refused *StreamError", err)
		}
		if se.Code.String() != "pool_refused" {
			t.Errorf("code name %q", se.Code)
		}
	})

	t.Run("agent rejects the header", func(t *testing.T) {
		dc, err := DialData(ctx, ps.addr, key, cfg)
		if err != nil {
			t.Fatal(err)
		}
		psEnd := ps.next(t)
		opened := make(chan error, 1)
		go func() {
			opened <- OpenData(psEnd, StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9999")}, 2*time.Second)
		}()
		if _, err := dc.ReadHeader(); err != nil {
			t.Fatal(err)
		}
		_ = dc.Reject(StreamNotExposed, "127.77.0.1:9999 is not exposed")
		var se *StreamError
		if err := <-opened; !errors.As(err, &se) || se.Code != StreamNotExposed {
			t.Fatalf("OpenData on a rejected header: %v", err)
		}
	})

	t.Run("garbage header", func(t *testing.T) {
		dc, err := DialData(ctx, ps.addr, key, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer dc.Close()
		psEnd := ps.next(t)
		_, _ = psEnd.Write([]byte{StreamVersion, 3, 9, 9, 9})
		if _, err := dc.ReadHeader(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("garbage header: got %v, want ErrMalformed", err)
		}
		dc2, err := DialData(ctx, ps.addr, key, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer dc2.Close()
		_, _ = ps.next(t).Write([]byte{7, 0})
		if _, err := dc2.ReadHeader(); !errors.Is(err, ErrVersion) {
			t.Fatalf("header version 7: got %v, want ErrVersion", err)
		}
	})

	t.Run("dead agent", func(t *testing.T) {
		dc, err := DialData(ctx, ps.addr, key, cfg)
		if err != nil {
			t.Fatal(err)
		}
		psEnd := ps.next(t)
		_ = dc.Close()
		err = OpenData(psEnd, StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100")}, 2*time.Second)
		var se *StreamError
		if err == nil || errors.As(err, &se) {
			t.Fatalf("OpenData on a closed data connection: got %v, want a connection error (not a refusal)", err)
		}
	})

	t.Run("silent agent", func(t *testing.T) {
		dc, err := DialData(ctx, ps.addr, key, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer dc.Close()
		psEnd := ps.next(t)
		start := time.Now()
		err = OpenData(psEnd, StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100")}, 100*time.Millisecond)
		if err == nil || time.Since(start) > time.Second {
			t.Fatalf("OpenData with no answer: %v after %v, want a timeout after 100ms", err, time.Since(start))
		}
	})

	t.Run("close ends an idle wait", func(t *testing.T) {
		dc, err := DialData(ctx, ps.addr, key, cfg)
		if err != nil {
			t.Fatal(err)
		}
		ps.next(t)
		done := make(chan error, 1)
		go func() { _, err := dc.ReadHeader(); done <- err }()
		time.Sleep(20 * time.Millisecond)
		_ = dc.Close()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("ReadHeader succeeded on a closed connection")
			}
		case <-time.After(2 * time.Second):
			t.Fatal("Close did not end ReadHeader")
		}
	})

	t.Run("silent PS", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
			}
		}()
		start := time.Now()
		_, err = DialData(ctx, ln.Addr().(*net.TCPAddr).AddrPort(), key, ClientConfig{Timeout: 150 * time.Millisecond})
		if err == nil || time.Since(start) > 2*time.Second {
			t.Fatalf("a PS that never answers: %v after %v, want a timeout", err, time.Since(start))
		}
	})
}

// A PS whose answer to a PoolJoin is a grant, a refusal (--data-path mux),
// or the Ack bad_request of a PS that predates pools.
func TestJoinPool(t *testing.T) {
	grant := &PoolGrant{Key: PoolKey{1, 2, 3}, Addr: netip.MustParseAddrPort("[2001:db8::7]:7001"), Size: 4}
	for _, tc := range []struct {
		name     string
		h        *recHandler
		oldPS    bool
		wantCode string
	}{
		{name: "grant", h: &recHandler{grant: grant}},
		{name: "mux", h: &recHandler{}, wantCode: "unavailable"},
		{name: "older ps", oldPS: true, wantCode: "bad_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ac, pc, _ := transports(t)[1].pair(t)
			psSess, psErr := welcomeAsPS(pc)
			as, err := Handshake(context.Background(), ac, testHello(), ClientConfig{Timeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer as.Close()
			if err := <-psErr; err != nil {
				t.Fatal(err)
			}
			ps := <-psSess
			defer ps.Close()
			go func() { // the control stream is the only one the PS opens here
				for {
					in, err := as.Accept(context.Background())
					if err != nil {
						return
					}
					_, _ = in.ReadHeader(time.Second)
				}
			}()
			ctl, err := ps.OpenControl(2 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if tc.oldPS {
				go serveAsOldPS(ctl)
			} else {
				go func() { _ = ctl.Serve(context.Background(), tc.h) }()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			g, err := as.Control().JoinPool(ctx)
			if tc.wantCode == "" {
				if err != nil || g.Key != grant.Key || g.Addr != grant.Addr || g.Size != grant.Size || g.ID == 0 {
					t.Fatalf("JoinPool: %+v, %v; want %+v", g, err, grant)
				}
			} else if !errors.Is(err, ErrNoPool) || !bytes.Contains([]byte(err.Error()), []byte(tc.wantCode)) {
				t.Fatalf("JoinPool: %+v, %v; want ErrNoPool naming %s", g, err, tc.wantCode)
			}
			// The channel still answers requests after the join.
			if _, err := as.Control().Withdraw(ctx); err != nil {
				t.Errorf("withdraw after the join: %v", err)
			}
		})
	}
}

// serveAsOldPS answers every request as a PS that predates pools does:
// an Ack bad_request for a type it does not know, ok for Withdraw.
func serveAsOldPS(c *ControlServer) {
	for {
		typ, body, err := readFrame(c.st, MaxControlMessage)
		if err != nil || len(body) < 4 {
			return
		}
		id := uint32(body[0])<<24 | uint32(body[1])<<16 | uint32(body[2])<<8 | uint32(body[3])
		ack := &Ack{ID: id, Code: CodeOK}
		if typ != ctlWithdraw && typ != ctlLostTunnel {
			ack = &Ack{ID: id, Code: CodeBadRequest, Reason: "unknown control message type"}
		}
		if c.send(ack, time.Second) != nil {
			return
		}
	}
}

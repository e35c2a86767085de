package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testpki"
)

// transport gives a connected pair (agent end, PS end) of one kind, with
// the PS end already wrapped in TLS for the tls kind.
type transport struct {
	name string
	pair func(t *testing.T) (agent, ps net.Conn, clientTLS *tls.Config)
}

func transports(t *testing.T) []transport {
	pki := testpki.NewPKI(t)
	tcpPair := func(t *testing.T) (net.Conn, net.Conn) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		ch := make(chan net.Conn, 1)
		go func() {
			c, _ := ln.Accept()
			ch <- c
		}()
		a, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		p := <-ch
		t.Cleanup(func() { a.Close(); p.Close() })
		return a, p
	}
	return []transport{
		{"pipe", func(t *testing.T) (net.Conn, net.Conn, *tls.Config) {
			a, p := net.Pipe()
			t.Cleanup(func() { a.Close(); p.Close() })
			return a, p, nil
		}},
		{"tcp", func(t *testing.T) (net.Conn, net.Conn, *tls.Config) {
			a, p := tcpPair(t)
			return a, p, nil
		}},
		{"tls", func(t *testing.T) (net.Conn, net.Conn, *tls.Config) {
			a, p := tcpPair(t)
			srv, err := ServerTLSConfig(TLSFiles{Cert: pki.ServerCert, Key: pki.ServerKey, CA: pki.CA})
			if err != nil {
				t.Fatal(err)
			}
			cli, err := ClientTLSConfig(TLSFiles{Cert: pki.ClientCert, Key: pki.ClientKey, CA: pki.CA}, "127.0.0.1")
			if err != nil {
				t.Fatal(err)
			}
			// As the PS runs it: the records of a frame leave in one write.
			return a, tls.Server(BatchRecords(p), srv), cli
		}},
	}
}

func testHello() *Hello {
	return &Hello{AgentID: "a1", AgentIP: netip.MustParseAddr("127.77.0.1"), Token: "tok", Epoch: 1,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.77.0.1:9100"), netip.MustParseAddrPort("127.77.0.1:9200")}}
}

// TestHandshakeAndStreams runs the whole protocol on every transport: the
// handshake, an accepted stream with data both ways and half-close, and a
// stream the agent refuses.
func TestHandshakeAndStreams(t *testing.T) {
	for _, tr := range transports(t) {
		t.Run(tr.name, func(t *testing.T) {
			ac, pc, cliTLS := tr.pair(t)
			psSess, psErr := welcomeAsPS(pc)
			as, err := Handshake(context.Background(), ac, testHello(), ClientConfig{TLS: cliTLS, Timeout: 5 * time.Second})
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			defer as.Close()
			if err := <-psErr; err != nil {
				t.Fatalf("ps side: %v", err)
			}
			ps := <-psSess
			defer ps.Close()
			if as.Welcome.PSID != "ps1" || as.Welcome.Endpoints[0].Port != 20001 || as.Welcome.Endpoints[1].Code != CodeConflict {
				t.Fatalf("agent got welcome %+v", as.Welcome)
			}
			go echoUpperAsAgent(as)

			st, err := ps.Open(StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100")}, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.Write([]byte("hello through the tunnel")); err != nil {
				t.Fatal(err)
			}
			if err := st.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(st)
			if err != nil {
				t.Fatalf("read answer after half-close: %v", err)
			}
			if string(got) != "HELLO THROUGH THE TUNNEL" {
				t.Fatalf("got %q", got)
			}
			_ = st.Close()

			st2, err := ps.Open(StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9999")}, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_, err = st2.Read(make([]byte, 1))
			var se *StreamError
			if !errors.As(err, &se) || se.Code != StreamNotExposed || !strings.Contains(se.Message, "not exposed") {
				t.Fatalf("stream for an unexposed target: got %v, want a not_exposed StreamError", err)
			}
		})
	}
}

// welcomeAsPS plays the PS of TestHandshakeAndStreams on pc: it reads the
// Hello, accepts one endpoint and refuses the other, and starts the
// session. The error comes first, then (when nil) the session.
func welcomeAsPS(pc net.Conn) (<-chan *PSSession, <-chan error) {
	psErr := make(chan error, 1)
	psSess := make(chan *PSSession, 1)
	go func() {
		_ = pc.SetDeadline(time.Now().Add(5 * time.Second))
		h, err := ReadHello(pc)
		if err != nil {
			psErr <- err
			return
		}
		if h.AgentID != "a1" || len(h.Endpoints) != 2 {
			psErr <- errors.New("ps got a different hello")
			return
		}
		w := &Welcome{PSID: "ps1", PSAddr: netip.MustParseAddr("127.0.0.1"),
			Endpoints: []EndpointResult{{Port: 20001}, {Code: CodeConflict, Reason: "held by agent b"}}}
		if err := WriteWelcome(pc, w); err != nil {
			psErr <- err
			return
		}
		_ = pc.SetDeadline(time.Time{})
		s, err := NewPSSession(pc, nil, 0)
		psErr <- err
		psSess <- s
	}()
	return psSess, psErr
}

// echoUpperAsAgent answers streams for port 9100 with what it read,
// upper-cased, once the PS half-closes; it refuses every other target.
func echoUpperAsAgent(as *AgentSession) {
	for {
		in, err := as.Accept(context.Background())
		if err != nil {
			return
		}
		h, err := in.ReadHeader(time.Second)
		if err != nil || h.Target.Port() != 9100 {
			_ = in.Reject(StreamNotExposed, "not exposed here")
			continue
		}
		st, err := in.Accept()
		if err != nil {
			continue
		}
		go func() {
			b, _ := io.ReadAll(st)
			_, _ = st.Write(bytes.ToUpper(b))
			_ = st.CloseWrite()
		}()
	}
}

// TestHandshakeRefusals checks, on every transport, that bad input is
// refused with the right code and that the agent sees the PS's reason.
func TestHandshakeRefusals(t *testing.T) {
	cases := []struct {
		name     string
		send     func(c net.Conn) error // raw bytes the "agent" sends
		wantErr  error                  // what ReadHello reports
		wantCode Code
	}{
		{"garbage", func(c net.Conn) error { _, err := c.Write([]byte("GET / HTTP/1.1\r\n\r\n")); return err }, ErrBadMagic, CodeBadRequest},
		{"unknown version", func(c net.Conn) error { _, err := c.Write(append(Magic[:], 9)); return err }, ErrVersion, CodeVersion},
		{"oversized frame", func(c net.Conn) error {
			_, err := c.Write(append(append(Magic[:], Version), msgHello, 0x7f, 0xff, 0xff, 0xff))
			return err
		}, ErrTooLarge, CodeTooLarge},
		{"wrong first message", func(c net.Conn) error {
			_, err := c.Write(append(append(Magic[:], Version), msgWelcome, 0, 0, 0, 0))
			return err
		}, ErrMalformed, CodeBadRequest},
		{"malformed hello", func(c net.Conn) error {
			_, err := c.Write(append(append(Magic[:], Version), msgHello, 0, 0, 0, 3, 0, 1, ' '))
			return err
		}, ErrMalformed, CodeBadRequest},
	}
	for _, tr := range transports(t) {
		for _, tc := range cases {
			t.Run(tr.name+"/"+tc.name, func(t *testing.T) {
				ac, pc, cliTLS := tr.pair(t)
				if cliTLS != nil {
					tc := tls.Client(ac, cliTLS)
					ac = tc
				}
				done := make(chan error, 1)
				go func() {
					_ = pc.SetDeadline(time.Now().Add(5 * time.Second))
					_, err := ReadHello(pc)
					if err == nil {
						done <- errors.New("ps accepted bad input")
						return
					}
					if !errors.Is(err, tc.wantErr) {
						done <- err
						return
					}
					done <- WriteRefuse(pc, &Refuse{Code: RefuseCode(err), Reason: err.Error()})
				}()
				_ = ac.SetDeadline(time.Now().Add(5 * time.Second))
				// Send aside: on a synchronous pipe the PS answers before
				// it has read everything.
				go func() { _ = tc.send(ac) }()
				typ, body, err := readFrame(ac, MaxMessageSize)
				if err != nil {
					t.Fatalf("agent read: %v", err)
				}
				if perr := <-done; perr != nil {
					t.Fatalf("ps side: got %v, want %v", perr, tc.wantErr)
				}
				r, err := DecodeRefuse(body)
				if typ != msgRefuse || err != nil {
					t.Fatalf("agent got frame %d (%v), want a refuse", typ, err)
				}
				if r.Code != tc.wantCode || r.Reason == "" {
					t.Fatalf("refuse %+v, want code %v with a reason", r, tc.wantCode)
				}
			})
		}
	}
}

// TestHandshakeDeadline: a PS that never answers makes Handshake fail at
// its deadline instead of hanging.
func TestHandshakeDeadline(t *testing.T) {
	for _, tr := range transports(t) {
		t.Run(tr.name, func(t *testing.T) {
			ac, pc, cliTLS := tr.pair(t)
			go func() { _, _ = io.Copy(io.Discard, pc) }() // reads, never answers
			_, err := Handshake(context.Background(), ac, testHello(), ClientConfig{TLS: cliTLS, Timeout: 300 * time.Millisecond})
			if err == nil {
				t.Fatal("handshake with a silent PS succeeded")
			}
		})
	}
}

func TestTLSVerificationIsNeverSkipped(t *testing.T) {
	pki := testpki.NewPKI(t)
	srv, err := ServerTLSConfig(TLSFiles{Cert: pki.ServerCert, Key: pki.ServerKey, CA: pki.CA})
	if err != nil {
		t.Fatal(err)
	}
	try := func(cli *tls.Config) error {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				_ = c.(*tls.Conn).Handshake()
				_, _ = io.Copy(io.Discard, c)
				c.Close()
			}
		}()
		c, err := tls.Dial("tcp", ln.Addr().String(), cli)
		if err != nil {
			return err
		}
		defer c.Close()
		// With TLS 1.3 a rejected client certificate shows on first read.
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			return err
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		return err
	}
	// Each client config must build: a nil config would fail the dial for
	// its own reason and let a negative case pass without testing anything.
	client := func(f TLSFiles) *tls.Config {
		t.Helper()
		c, err := ClientTLSConfig(f, "127.0.0.1")
		if err != nil || c == nil {
			t.Fatalf("client tls config %+v: %v, %v", f, c, err)
		}
		return c
	}
	err = try(client(TLSFiles{Cert: pki.ClientCert, Key: pki.ClientKey, CA: pki.OtherCA}))
	var unknownCA x509.UnknownAuthorityError
	if !errors.As(err, &unknownCA) {
		t.Fatalf("an agent given another CA must reject the PS certificate as signed by an unknown authority, got %v", err)
	}
	err = try(client(TLSFiles{CA: pki.CA}))
	if err == nil || !strings.Contains(err.Error(), "tls: certificate required") {
		t.Fatalf("a PS with --tls-ca must refuse an agent without a client certificate (alert \"certificate required\"), got %v", err)
	}
	if err := try(client(TLSFiles{Cert: pki.ClientCert, Key: pki.ClientKey, CA: pki.CA})); err != nil {
		t.Fatalf("valid mutual TLS failed: %v", err)
	}
	if c, err := ServerTLSConfig(TLSFiles{CA: pki.CA}); err == nil || c != nil || !strings.Contains(err.Error(), "needs both --tls-cert and --tls-key") {
		t.Fatalf("a PS given only a CA must refuse to start rather than serve plain TCP, got %v, %v", c, err)
	}
}

package relay

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// wrappedTCP is a connection wrapper that hands its TCP connection over
// (TCPConner), as the tunnel's data connection does.
type wrappedTCP struct{ tc *net.TCPConn }

func (w wrappedTCP) TCPConn() *net.TCPConn { return w.tc }

// The rest of net.Conn, which Splice never uses on a TCPConner.
func (w wrappedTCP) Read(b []byte) (int, error)         { return w.tc.Read(b) }
func (w wrappedTCP) Write(b []byte) (int, error)        { return w.tc.Write(b) }
func (w wrappedTCP) Close() error                       { return w.tc.Close() }
func (w wrappedTCP) LocalAddr() net.Addr                { return w.tc.LocalAddr() }
func (w wrappedTCP) RemoteAddr() net.Addr               { return w.tc.RemoteAddr() }
func (w wrappedTCP) SetDeadline(t time.Time) error      { return w.tc.SetDeadline(t) }
func (w wrappedTCP) SetReadDeadline(t time.Time) error  { return w.tc.SetReadDeadline(t) }
func (w wrappedTCP) SetWriteDeadline(t time.Time) error { return w.tc.SetWriteDeadline(t) }

// startSplice is startJoinWith for Splice; with wrap, b is passed as a
// TCPConner instead of a *net.TCPConn.
func startSplice(t *testing.T, o Options, wrap bool) *relayed {
	t.Helper()
	x, a := tcpPair(t)
	b, y := tcpPair(t)
	for _, c := range []net.Conn{x, y} {
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
	}
	r := &relayed{x: x, y: y, done: make(chan joinResult, 1)}
	var bConn net.Conn = b
	if wrap {
		bConn = wrappedTCP{b}
	}
	go func() {
		var res joinResult
		res.ab, res.ba, res.err = Splice(a, bConn, o)
		r.done <- res
	}()
	return r
}

// 50 MB each way at once, with counters: every byte arrives in order (a
// checksum), Splice reports the totals and the counters reach them.
func TestSpliceCarries50MBBothWaysIntact(t *testing.T) {
	for _, wrap := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "tcpconner"}[wrap], func(t *testing.T) {
			ab, ba := &counter{}, &counter{}
			r := startSplice(t, Options{AToB: ab, BToA: ba, IdleTimeout: time.Minute}, wrap)
			const upN, downN = 50 << 20, 50<<20 + 12345
			var wg sync.WaitGroup
			var upSum, downSum, upGot, downGot [32]byte
			var upRead, downRead int64
			var upErr, downErr error
			send := func(c *net.TCPConn, n int, sum *[32]byte) {
				defer wg.Done()
				buf := make([]byte, n)
				_, _ = rand.Read(buf)
				*sum = sha256.Sum256(buf)
				if _, err := c.Write(buf); err != nil {
					t.Errorf("write: %v", err)
				}
				_ = c.CloseWrite()
			}
			recv := func(c *net.TCPConn, sum *[32]byte, n *int64, errp *error) {
				defer wg.Done()
				h := sha256.New()
				*n, *errp = io.Copy(h, c)
				copy(sum[:], h.Sum(nil))
			}
			wg.Add(4)
			go send(r.x, upN, &upSum)
			go send(r.y, downN, &downSum)
			go recv(r.y, &upGot, &upRead, &upErr)
			go recv(r.x, &downGot, &downRead, &downErr)
			wg.Wait()
			if upErr != nil || upRead != upN || upGot != upSum {
				t.Errorf("x->y: read %d of %d bytes, %v; checksum match %v", upRead, upN, upErr, upGot == upSum)
			}
			if downErr != nil || downRead != downN || downGot != downSum {
				t.Errorf("y->x: read %d of %d bytes, %v; checksum match %v", downRead, downN, downErr, downGot == downSum)
			}
			if res := r.wait(t); res.err != nil || res.ab != upN || res.ba != downN {
				t.Fatalf("Splice: %d, %d, %v; want %d, %d, nil", res.ab, res.ba, res.err, upN, downN)
			}
			if ab.n.Load() != upN || ba.n.Load() != downN {
				t.Fatalf("counters %d and %d, want %d and %d", ab.n.Load(), ba.n.Load(), upN, downN)
			}
		})
	}
}

// Whichever side half-closes first, its peer sees EOF and the other
// direction keeps flowing until it ends too.
func TestSpliceHalfCloseEachWay(t *testing.T) {
	for _, first := range []string{"x closes first", "y closes first"} {
		t.Run(first, func(t *testing.T) {
			r := startSplice(t, Options{AToB: &counter{}, BToA: &counter{}}, false)
			talker, listener := r.x, r.y
			if first == "y closes first" {
				talker, listener = r.y, r.x
			}
			question, answer := []byte("how many bytes?"), []byte("fifteen, then this answer")
			if _, err := talker.Write(question); err != nil {
				t.Fatal(err)
			}
			if err := talker.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(listener)
			if err != nil || !bytes.Equal(got, question) {
				t.Fatalf("the listener read %q, %v; want %q then EOF", got, err, question)
			}
			if _, err := listener.Write(answer); err != nil {
				t.Fatalf("the listener cannot answer after the talker's half-close: %v", err)
			}
			if err := listener.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err = io.ReadAll(talker)
			if err != nil || !bytes.Equal(got, answer) {
				t.Fatalf("the talker read %q, %v; want %q then EOF", got, err, answer)
			}
			if res := r.wait(t); res.err != nil {
				t.Fatalf("Splice after two clean half-closes: %v", res.err)
			}
		})
	}
}

// A failed direction (y resets) aborts the splice: x sees a reset, not a
// clean EOF, and Splice reports the failure.
func TestSpliceFailedDirectionResetsThePeer(t *testing.T) {
	r := startSplice(t, Options{}, false)
	echoOnce(t, r.x, r.y, "hello")
	_ = r.y.SetLinger(0)
	_ = r.y.Close()
	res := r.wait(t)
	if res.err == nil {
		t.Fatal("Splice returned no error after y's reset")
	}
	n, err := r.x.Read(make([]byte, 16))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("x read %d bytes, %v after y's reset; want ECONNRESET, not EOF", n, err)
	}
}

// Counters move while a transfer runs: after 5 MiB and a bit more went
// through, with the connection still open and the splice blocked in its
// next chunk, the counter shows at least the 5 full chunks.
func TestSpliceCountersMoveWhileBytesFlow(t *testing.T) {
	ab := &counter{}
	r := startSplice(t, Options{AToB: ab, BToA: &counter{}}, false)
	const n = 5<<20 + 100
	go func() { _, _ = r.x.Write(make([]byte, n)) }()
	if _, err := io.ReadFull(r.y, make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(ioTimeout)
	for ab.n.Load() < 5<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("a->b counter %d while open after %d bytes went through, want at least %d", ab.n.Load(), n, 5<<20)
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = r.x.CloseWrite()
	_ = r.y.CloseWrite()
	if res := r.wait(t); res.err != nil || res.ab != n || ab.n.Load() != n {
		t.Fatalf("Splice: %d bytes a->b (counter %d), %v; want %d", res.ab, ab.n.Load(), res.err, n)
	}
}

// A quiet splice is closed after the idle timeout with ErrIdle; a slow
// trickle, far less than a chunk per timeout, keeps it open (the kernel's
// byte count tells the timer bytes moved although no chunk completed).
func TestSpliceIdleTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	r := startSplice(t, Options{AToB: &counter{}, IdleTimeout: timeout}, false)
	// Trickle for five timeouts, one byte each way every timeout/4.
	for i := range 20 {
		time.Sleep(timeout / 4)
		if i%2 == 0 {
			echoOnce(t, r.x, r.y, "p")
		} else {
			echoOnce(t, r.y, r.x, "q")
		}
	}
	quietSince := time.Now()
	res := r.wait(t)
	quiet := time.Since(quietSince)
	if !errors.Is(res.err, ErrIdle) {
		t.Fatalf("Splice returned %v, want ErrIdle", res.err)
	}
	if quiet < timeout-50*time.Millisecond {
		t.Fatalf("closed after %v of quiet, before the %v timeout", quiet, timeout)
	}
	if quiet > 3*timeout+time.Second {
		t.Fatalf("closed only after %v of quiet with a %v timeout", quiet, timeout)
	}
	for name, c := range map[string]net.Conn{"x": r.x, "y": r.y} {
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("%s read %d bytes, %v after the idle close; want the end", name, n, err)
		}
	}
	if res.ab != 10 || res.ba != 10 {
		t.Fatalf("Splice reports %d and %d bytes, want 10 each way", res.ab, res.ba)
	}
}

// TLS cannot be spliced: Splice falls back to the user-space loop and the
// bytes still arrive, half-close included.
func TestSpliceFallsBackForTLS(t *testing.T) {
	serverCfg, clientCfg := tlsPair(t)
	x, a := tcpPair(t)
	b, y := tcpPair(t)
	tx, ta := tls.Client(x, clientCfg), tls.Server(a, serverCfg)
	done := make(chan error, 1)
	go func() {
		_, _, err := Splice(ta, b, Options{AToB: &counter{}})
		done <- err
	}()
	_ = tx.SetDeadline(time.Now().Add(ioTimeout))
	_ = y.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := tx.Write([]byte("over tls")); err != nil {
		t.Fatal(err)
	}
	_ = tx.CloseWrite()
	got, err := io.ReadAll(y)
	if err != nil || string(got) != "over tls" {
		t.Fatalf("y read %q, %v; want %q then EOF", got, err, "over tls")
	}
	_ = y.CloseWrite()
	if _, err := io.ReadAll(tx); err != nil {
		t.Fatalf("x after y's half-close: %v, want EOF", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Splice over TLS: %v", err)
	}
}

// tlsPair returns a server config with a fresh self-signed certificate for
// 127.0.0.1 and a client config that trusts exactly that certificate.
func tlsPair(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	client = &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}
	return server, client
}

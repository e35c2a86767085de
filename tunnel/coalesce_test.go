package tunnel

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"sync/atomic"
	"testing"

	"github.com/tether-net/tether/internal/testpki"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// tlsFramePair returns the sending side of a TLS connection as the session
// wraps it (coalescingConn over TLS, over a recordBatcher when batched),
// the counter of its socket writes, and the receiving TLS end.
func tlsFramePair(t *testing.T, batched bool) (*coalescingConn, *countingConn, *tls.Conn) {
	t.Helper()
	pki := testpki.NewPKI(t)
	srv, err := ServerTLSConfig(TLSFiles{Cert: pki.ServerCert, Key: pki.ServerKey, CA: pki.CA})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := ClientTLSConfig(TLSFiles{Cert: pki.ClientCert, Key: pki.ClientKey, CA: pki.CA}, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		tc := tls.Server(c, srv)
		if err := tc.Handshake(); err != nil {
			c.Close()
			accepted <- nil
			return
		}
		accepted <- tc
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingConn{Conn: raw}
	var under net.Conn = counted
	if batched {
		under = BatchRecords(counted)
	}
	tc := tls.Client(under, cli)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	peer := <-accepted
	if peer == nil {
		t.Fatal("server side of the TLS handshake failed")
	}
	t.Cleanup(func() { tc.Close(); peer.Close() })
	cc := newCoalescingConn(tc)
	if batched != (cc.batch != nil) {
		t.Fatalf("coalescingConn found a batcher: %v, want %v", cc.batch != nil, batched)
	}
	return cc, counted, peer
}

// sendFrames writes frames of 256 KiB as yamux's send loop does (header,
// then body) and checks that the peer receives exactly those bytes. It
// returns the socket writes per frame.
func sendFrames(t *testing.T, batched bool) float64 {
	const frames, size = 8, 256 << 10
	cc, counted, peer := tlsFramePair(t, batched)
	// crypto/tls starts with small records and moves to 16 KiB ones after
	// 128 KiB: get past that first, as any busy session has.
	warm := make([]byte, 256<<10)
	warmed := make(chan error, 1)
	go func() { _, err := io.CopyN(io.Discard, peer, int64(len(warm))); warmed <- err }()
	if _, err := cc.Conn.Write(warm); err != nil {
		t.Fatal(err)
	}
	if err := <-warmed; err != nil {
		t.Fatal(err)
	}

	var want bytes.Buffer
	body := make([]byte, size)
	received := make(chan []byte, 1)
	go func() {
		got := make([]byte, frames*(yamuxHeaderSize+size))
		if _, err := io.ReadFull(peer, got); err != nil {
			t.Error(err)
		}
		received <- got
	}()
	before := counted.writes.Load()
	for i := range frames {
		if _, err := rand.Read(body); err != nil {
			t.Fatal(err)
		}
		var hdr [yamuxHeaderSize]byte
		hdr[0], hdr[1] = 0, yamuxTypeData
		binary.BigEndian.PutUint32(hdr[4:8], uint32(i+1))
		binary.BigEndian.PutUint32(hdr[8:12], size)
		if n, err := cc.Write(hdr[:]); err != nil || n != len(hdr) {
			t.Fatalf("header: %d, %v", n, err)
		}
		if n, err := cc.Write(body); err != nil || n != len(body) {
			t.Fatalf("body: %d, %v", n, err)
		}
		want.Write(hdr[:])
		want.Write(body)
	}
	writes := counted.writes.Load() - before
	if got := <-received; !bytes.Equal(got, want.Bytes()) {
		t.Fatal("the peer received other bytes than the frames written")
	}
	return float64(writes) / frames
}

// TestBatchedTLSFrameIsOneWrite: over BatchRecords, a 256 KiB frame (17
// TLS records) leaves in one socket write; without it, crypto/tls writes
// each record on its own (the negative case: what the batcher saves).
func TestBatchedTLSFrameIsOneWrite(t *testing.T) {
	if got := sendFrames(t, true); got != 1 {
		t.Errorf("batched: %.1f socket writes per frame, want 1", got)
	}
	if got := sendFrames(t, false); got < 16 {
		t.Errorf("unbatched: %.1f socket writes per frame, want one per 16 KiB record (>= 16)", got)
	}
}

// TestRecordBatcherPassesThroughOutsideFrames: the handshake and any write
// outside a held frame go straight to the socket.
func TestRecordBatcherPassesThroughOutsideFrames(t *testing.T) {
	cc, counted, peer := tlsFramePair(t, true)
	if counted.writes.Load() == 0 {
		t.Fatal("the handshake wrote nothing through the batcher")
	}
	before := counted.writes.Load()
	go func() { _, _ = cc.Write([]byte("window update")) }()
	buf := make([]byte, len("window update"))
	if _, err := io.ReadFull(peer, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != "window update" || counted.writes.Load() != before+1 {
		t.Fatalf("got %q after %d writes, want the bytes in one write", buf, counted.writes.Load()-before)
	}
}

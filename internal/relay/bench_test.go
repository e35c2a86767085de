package relay_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/relay"
	"github.com/tether-net/tether/tunnel"
)

// The data path of a tether connection in one process, for comparing
// versions of the copy loops: client <-TCP-> Join (as the PS) <-tunnel
// stream over TCP-> Join (as the agent) <-TCP-> server. `go test
// ./internal/relay -run x -bench .` reports wall time and CPU time per op;
// on a loaded machine compare the CPU time.

var target = netip.MustParseAddrPort("127.77.0.1:9100")

// pathOptions shapes the path tunnelPaths builds.
type pathOptions struct {
	tls     bool // the tunnel runs over TLS, as with --tls-cert
	batch   bool // TLS over tunnel.BatchRecords: a frame's records in one write
	streams int  // carried connections over the one tunnel (0 = 1)
}

// tunnelPath returns the client's and the server's ends of one carried
// connection, with counters on both joins as the PS and the agent have.
func tunnelPath(b *testing.B) (client, server *net.TCPConn) {
	p := tunnelPaths(b, pathOptions{})
	return p[0].client, p[0].server
}

// carried is one connection through the tunnel: the client's end (at the
// PS) and the server's end (at the agent).
type carried struct{ client, server *net.TCPConn }

// tunnelPaths builds one tunnel session and carries o.streams connections
// over it.
func tunnelPaths(b *testing.B, o pathOptions) []carried {
	b.Helper()
	psRaw, agentRaw := tcpPair(b)
	var psConn, agentConn net.Conn = psRaw, agentRaw
	var clientTLS *tls.Config
	if o.tls {
		serverTLS, ctls := benchTLS(b)
		if o.batch {
			psConn, agentConn = tunnel.BatchRecords(psRaw), tunnel.BatchRecords(agentRaw)
		}
		psConn, clientTLS = tls.Server(psConn, serverTLS), ctls
	}
	psc := make(chan *tunnel.PSSession, 1)
	go func() {
		if _, err := tunnel.ReadHello(psConn); err != nil {
			b.Error(err)
			psc <- nil
			return
		}
		w := &tunnel.Welcome{PSID: "ps1", PSAddr: netip.MustParseAddr("127.0.0.1"), Endpoints: []tunnel.EndpointResult{{Port: 20000}}}
		if err := tunnel.WriteWelcome(psConn, w); err != nil {
			b.Error(err)
			psc <- nil
			return
		}
		s, err := tunnel.NewPSSession(psConn, nil, 0)
		if err != nil {
			b.Error(err)
		}
		psc <- s
	}()
	as, err := tunnel.Handshake(context.Background(), agentConn,
		&tunnel.Hello{AgentID: "a1", AgentIP: target.Addr(), Epoch: 1, Endpoints: []netip.AddrPort{target}},
		tunnel.ClientConfig{Timeout: 5 * time.Second, TLS: clientTLS})
	if err != nil {
		b.Fatal(err)
	}
	ps := <-psc
	if ps == nil {
		b.FailNow()
	}
	b.Cleanup(func() { ps.Close(); as.Close() })
	if tc, ok := psConn.(*tls.Conn); ok {
		// AES-GCM wins on a CPU with AES instructions (Go's default
		// then); ChaCha20 would say the CPU has none.
		b.Logf("tunnel TLS: %s, cipher %s", tls.VersionName(tc.ConnectionState().Version), tls.CipherSuiteName(tc.ConnectionState().CipherSuite))
	}

	paths := make([]carried, max(1, o.streams))
	for i := range paths {
		client, psEnd := tcpPair(b)
		agentEnd, server := tcpPair(b)
		go func() {
			in, err := as.Accept(context.Background())
			if err != nil {
				return
			}
			if _, err := in.ReadHeader(5 * time.Second); err != nil {
				return
			}
			st, err := in.Accept()
			if err != nil {
				return
			}
			_, _, _ = relay.Join(st, agentEnd, discard{}, discard{})
		}()
		st, err := ps.Open(tunnel.StreamHeader{Target: target, Source: netip.MustParseAddrPort("127.0.0.1:1")}, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		go func() { _, _, _ = relay.Join(psEnd, st, discard{}, discard{}) }()
		paths[i] = carried{client, server}
	}
	return paths
}

// benchTLS returns a server configuration with a fresh self-signed
// certificate and a client configuration that trusts it.
func benchTLS(b *testing.B) (server, client *tls.Config) {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "ps.bench"},
		DNSNames:     []string{"ps.bench"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}}, MinVersion: tls.VersionTLS12}
	client = &tls.Config{RootCAs: roots, ServerName: "ps.bench", MinVersion: tls.VersionTLS12}
	return server, client
}

type discard struct{}

func (discard) Add(float64) {}

func tcpPair(b *testing.B) (*net.TCPConn, *net.TCPConn) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); acc <- c }()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	a := <-acc
	if a == nil {
		b.Fatal("accept failed")
	}
	b.Cleanup(func() { d.Close(); a.Close() })
	return d.(*net.TCPConn), a.(*net.TCPConn)
}

// BenchmarkTunnelPathBulk downloads through the path, as test/bench/tunnel's
// bulk measurement does: one stream, plain TCP; the variants below carry 8
// streams over the one tunnel, and run the tunnel over TLS.
func BenchmarkTunnelPathBulk(b *testing.B)     { benchPathBulk(b, pathOptions{}) }
func BenchmarkTunnelPathBulk8(b *testing.B)    { benchPathBulk(b, pathOptions{streams: 8}) }
func BenchmarkTunnelPathBulkTLS(b *testing.B)  { benchPathBulk(b, pathOptions{tls: true}) }
func BenchmarkTunnelPathBulk8TLS(b *testing.B) { benchPathBulk(b, pathOptions{tls: true, streams: 8}) }
func BenchmarkTunnelPathBulkTLSBatched(b *testing.B) {
	benchPathBulk(b, pathOptions{tls: true, batch: true})
}
func BenchmarkTunnelPathBulk8TLSBatched(b *testing.B) {
	benchPathBulk(b, pathOptions{tls: true, batch: true, streams: 8})
}
func BenchmarkTunnelPathPingPong(b *testing.B)    { benchPathPingPong(b, pathOptions{}) }
func BenchmarkTunnelPathPingPongTLS(b *testing.B) { benchPathPingPong(b, pathOptions{tls: true}) }
func BenchmarkTunnelPathPingPongTLSBatched(b *testing.B) {
	benchPathPingPong(b, pathOptions{tls: true, batch: true})
}

// benchPathBulk downloads on every carried connection at once; an op is
// 256 KiB read by one of the clients.
func benchPathBulk(b *testing.B, o pathOptions) {
	const chunk = 256 << 10
	paths := tunnelPaths(b, o)
	for _, p := range paths {
		go func() {
			data := make([]byte, chunk)
			for {
				if _, err := p.server.Write(data); err != nil {
					return
				}
			}
		}()
	}
	b.SetBytes(chunk)
	var left atomic.Int64
	left.Store(int64(b.N))
	defer reportCPU(b)()
	var wg sync.WaitGroup
	for _, p := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for left.Add(-1) >= 0 {
				if _, err := io.ReadFull(p.client, buf); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// benchPathPingPong is request/response (64 bytes each way) on a kept
// connection.
func benchPathPingPong(b *testing.B, o pathOptions) {
	p := tunnelPaths(b, o)[0]
	go func() {
		_, _ = io.CopyBuffer(struct{ io.Writer }{p.server}, struct{ io.Reader }{p.server}, make([]byte, 4096))
	}()
	msg := make([]byte, 64)
	defer reportCPU(b)()
	for range b.N {
		if _, err := p.client.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(p.client, msg); err != nil {
			b.Fatal(err)
		}
	}
}

// reportCPU resets the timer and returns a function that reports the
// process's CPU time (user + system) per op: on a loaded machine wall time
// says little, CPU time still compares two versions of the copy loops.
func reportCPU(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	b.ResetTimer()
	return func() {
		b.ReportMetric(float64(cpu()-start)/float64(b.N), "cpu-ns/op")
	}
}

// BenchmarkBulkSplice and BenchmarkBulkJoinWith move one bulk download
// through a relay with counters and an idle timeout, as the PS carries a
// pooled data connection (Splice) and a plain TCP pair before (JoinWith's
// user-space loop): compare cpu-ns/op and MB/s.
func BenchmarkBulkSplice(b *testing.B) {
	benchBulk(b, func(x, y net.Conn, o relay.Options) { _, _, _ = relay.Splice(x, y, o) })
}

func BenchmarkBulkJoinWith(b *testing.B) {
	benchBulk(b, func(x, y net.Conn, o relay.Options) {
		_, _, _ = relay.JoinWith(relay.HalfClose(x), relay.HalfClose(y), o)
	})
}

func benchBulk(b *testing.B, join func(x, y net.Conn, o relay.Options)) {
	client, a := tcpPair(b)
	c, server := tcpPair(b)
	go join(a, c, relay.Options{AToB: discard{}, BToA: discard{}, IdleTimeout: time.Minute})
	chunk := make([]byte, 256<<10)
	go func() {
		for {
			if _, err := server.Write(chunk); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, len(chunk))
	b.SetBytes(int64(len(chunk)))
	defer reportCPU(b)()
	for range b.N {
		if _, err := io.ReadFull(client, buf); err != nil {
			b.Fatal(err)
		}
	}
}

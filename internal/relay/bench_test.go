package relay_test

import (
	"context"
	"io"
	"net"
	"net/netip"
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

// tunnelPath returns the client's and the server's ends of one carried
// connection, with counters on both joins as the PS and the agent have.
func tunnelPath(b *testing.B) (client, server *net.TCPConn) {
	b.Helper()
	psRaw, agentRaw := tcpPair(b)
	psc := make(chan *tunnel.PSSession, 1)
	go func() {
		if _, err := tunnel.ReadHello(psRaw); err != nil {
			b.Error(err)
			psc <- nil
			return
		}
		w := &tunnel.Welcome{PSID: "ps1", PSAddr: netip.MustParseAddr("127.0.0.1"), Endpoints: []tunnel.EndpointResult{{Port: 20000}}}
		if err := tunnel.WriteWelcome(psRaw, w); err != nil {
			b.Error(err)
			psc <- nil
			return
		}
		s, err := tunnel.NewPSSession(psRaw, nil, 0)
		if err != nil {
			b.Error(err)
		}
		psc <- s
	}()
	as, err := tunnel.Handshake(context.Background(), agentRaw,
		&tunnel.Hello{AgentID: "a1", AgentIP: target.Addr(), Epoch: 1, Endpoints: []netip.AddrPort{target}},
		tunnel.ClientConfig{Timeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ps := <-psc
	if ps == nil {
		b.FailNow()
	}
	b.Cleanup(func() { ps.Close(); as.Close() })

	client, psConn := tcpPair(b)
	agentConn, server := tcpPair(b)
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
		_, _, _ = relay.Join(st, agentConn, discard{}, discard{})
	}()
	st, err := ps.Open(tunnel.StreamHeader{Target: target, Source: netip.MustParseAddrPort("127.0.0.1:1")}, 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	go func() { _, _, _ = relay.Join(psConn, st, discard{}, discard{}) }()
	return client, server
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
// bulk measurement does.
func BenchmarkTunnelPathBulk(b *testing.B) {
	client, server := tunnelPath(b)
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

// BenchmarkTunnelPathPingPong is request/response on a kept connection.
func BenchmarkTunnelPathPingPong(b *testing.B) {
	client, server := tunnelPath(b)
	go func() {
		_, _ = io.CopyBuffer(struct{ io.Writer }{server}, struct{ io.Reader }{server}, make([]byte, 4096))
	}()
	msg := make([]byte, 64)
	defer reportCPU(b)()
	for range b.N {
		if _, err := client.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(client, msg); err != nil {
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

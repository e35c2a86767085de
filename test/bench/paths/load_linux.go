package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ---- servers: the targets every column reaches ----------------------------------

// services are the addresses of the four test services, as one column
// reaches them: direct, or a PS's (or frps's) port for each.
type services struct{ up, down, echo, rpc string }

// startServers starts the four services on loopback ports of their own.
func startServers() (services, error) {
	var s services
	for _, x := range []struct {
		dst    *string
		handle func(net.Conn)
	}{{&s.up, sinkServer}, {&s.down, sourceServer}, {&s.echo, echoServer}, {&s.rpc, oneShotServer}} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return s, fmt.Errorf("listen for a test service: %w", err)
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); x.handle(c) }()
			}
		}()
		*x.dst = ln.Addr().String()
	}
	return s, nil
}

const bulkChunk = 256 << 10

var zeros = make([]byte, bulkChunk)

// endMark ends an upload: the stream is zeros, then this byte. Not a
// half-close, since frp closes both ways when one side half-closes.
const endMark = 0xff

// sinkServer reads zeros until the end mark and answers how many bytes
// came before it (8 bytes, big endian): the uploading client checks every
// byte it sent arrived. An explicit loop with a large buffer: io.Discard
// would read 8 KiB at a time.
func sinkServer(c net.Conn) {
	buf := make([]byte, bulkChunk)
	var n int64
	for {
		k, err := c.Read(buf)
		if i := bytes.IndexByte(buf[:k], endMark); i >= 0 {
			n += int64(i)
			break
		}
		n += int64(k)
		if err != nil {
			return // no end mark: the client sees no count
		}
	}
	var out [8]byte
	binary.BigEndian.PutUint64(out[:], uint64(n))
	_, _ = c.Write(out[:])
}

// sourceServer writes zeros until the client goes away.
func sourceServer(c net.Conn) {
	for {
		if _, err := c.Write(zeros); err != nil {
			return
		}
	}
}

// echoServer echoes every read (a plain loop: the same cost on every
// column, never a kernel splice of the socket onto itself).
func echoServer(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		k, err := c.Read(buf)
		if k > 0 {
			if _, werr := c.Write(buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// oneShotServer reads a 16-byte request, answers it and 16 zero bytes, and
// closes: a tiny RPC.
func oneShotServer(c net.Conn) {
	buf := make([]byte, 32)
	if _, err := io.ReadFull(c, buf[:16]); err != nil {
		return
	}
	_, _ = c.Write(buf)
}

// ---- clients --------------------------------------------------------------------

// bulkResult is one bulk measurement: bytes moved, and the time it took.
type bulkResult struct {
	bytes int64
	took  time.Duration
}

func (r bulkResult) gbits() float64 { return float64(r.bytes) * 8 / 1e9 }

// Gbps is the throughput in Gbit/s.
func (r bulkResult) Gbps() float64 { return r.gbits() / r.took.Seconds() }

// bulkUp uploads zeros to the sink at addr over n connections for d; each
// connection then sends the end mark and checks the sink's count of what
// arrived against what it sent. The time runs until the last count came back, so
// bytes still in flight at the deadline count, and their time too.
func bulkUp(addr string, n int, d time.Duration) (bulkResult, error) {
	return parallel(n, d, func(stop time.Time) (int64, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		_ = c.SetDeadline(stop.Add(30 * time.Second))
		var sent int64
		for first := true; first || time.Now().Before(stop); first = false {
			k, err := c.Write(zeros)
			sent += int64(k)
			if err != nil {
				return sent, fmt.Errorf("bulk up: write after %d bytes: %w", sent, err)
			}
		}
		if _, err := c.Write([]byte{endMark}); err != nil {
			return sent, fmt.Errorf("bulk up: write the end mark after %d bytes: %w", sent, err)
		}
		var count [8]byte
		if _, err := io.ReadFull(c, count[:]); err != nil {
			return sent, fmt.Errorf("bulk up: the sink's count after %d bytes sent: %w", sent, err)
		}
		if got := int64(binary.BigEndian.Uint64(count[:])); got != sent {
			return sent, fmt.Errorf("bulk up: the sink read %d bytes, %d were sent", got, sent)
		}
		return sent, nil
	})
}

// bulkDown downloads from the source at addr over n connections for d.
// Each connection must carry data, and only zeros (checked on its first
// and last read, not to slow the stream down).
func bulkDown(addr string, n int, d time.Duration) (bulkResult, error) {
	return parallel(n, d, func(stop time.Time) (int64, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		_ = c.SetDeadline(stop.Add(30 * time.Second))
		buf := make([]byte, bulkChunk)
		var got int64
		k := 0
		for first := true; first || time.Now().Before(stop); first = false {
			k, err = c.Read(buf)
			got += int64(k)
			if err != nil {
				return got, fmt.Errorf("bulk down: read after %d bytes: %w", got, err)
			}
			if first && !allZero(buf[:k]) {
				return got, errors.New("bulk down: the first read carried non-zero bytes")
			}
		}
		if !allZero(buf[:k]) {
			return got, errors.New("bulk down: the last read carried non-zero bytes")
		}
		return got, nil
	})
}

// parallel runs stream on n connections at once until d from now and sums
// the bytes they moved; every stream must have moved some.
func parallel(n int, d time.Duration, stream func(stop time.Time) (int64, error)) (bulkResult, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, n)
	start := time.Now()
	stop := start.Add(d)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := stream(stop)
			total.Add(got)
			if err == nil && got == 0 {
				err = errors.New("a connection carried no data")
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	return bulkResult{total.Load(), time.Since(start)}, errors.Join(errs...)
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// rrResult is one request/response measurement over kept connections.
type rrResult struct {
	rate     float64 // requests per second, all connections together
	p50, p99 time.Duration
}

// requestResponse runs n kept connections to the echo service at addr,
// each sending 64-byte numbered requests one at a time and checking each
// echo, for d (and at least a few samples each); it returns the total
// rate and the percentiles of every round trip past each connection's
// warm-up.
func requestResponse(addr string, n int, d time.Duration) (rrResult, error) {
	const warmup, minSamples = 20, 20
	lat := make([][]time.Duration, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(d)
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs[w] = err
				return
			}
			defer c.Close()
			_ = c.SetDeadline(stop.Add(30 * time.Second))
			req, resp := make([]byte, 64), make([]byte, 64)
			for i := 0; time.Now().Before(stop) || len(lat[w]) < minSamples; i++ {
				binary.BigEndian.PutUint64(req, uint64(w)<<32|uint64(i))
				t0 := time.Now()
				if _, err := c.Write(req); err != nil {
					errs[w] = err
					return
				}
				if _, err := io.ReadFull(c, resp); err != nil {
					errs[w] = fmt.Errorf("request/response: echo of request %d: %w", i, err)
					return
				}
				if !bytes.Equal(req, resp) {
					errs[w] = fmt.Errorf("request/response: echo of request %d: got %x, want %x", i, resp[:8], req[:8])
					return
				}
				if i >= warmup {
					lat[w] = append(lat[w], time.Since(t0))
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return rrResult{}, err
	}
	all := slices.Concat(lat...)
	slices.Sort(all)
	// The rate counts warm-up requests too: they took part of the time.
	return rrResult{
		rate: float64(len(all)+n*warmup) / took.Seconds(),
		p50:  all[len(all)*50/100],
		p99:  all[min(len(all)-1, len(all)*99/100)],
	}, nil
}

// connectRate runs n clients that each connect, send a request, read the
// answer and close, for d; connections per second.
func connectRate(addr string, n int, d time.Duration) (float64, error) {
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, n)
	start := time.Now()
	stop := start.Add(d)
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop); i++ {
				if err := oneShot(addr, uint64(w)<<32|uint64(i)); err != nil {
					errs[w] = err
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// oneShot connects, sends request number id, checks the answer (the
// request, then 16 zero bytes) and closes.
func oneShot(addr string, id uint64) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	req, resp := make([]byte, 16), make([]byte, 32)
	binary.BigEndian.PutUint64(req, id)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(req); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, resp); err != nil {
		return fmt.Errorf("connect+request+close: answer to request %x: %w", req, err)
	}
	if !bytes.Equal(resp[:16], req) || !allZero(resp[16:]) {
		return fmt.Errorf("connect+request+close: answer to request %x: got %x", req, resp)
	}
	return nil
}

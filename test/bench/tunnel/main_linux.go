// Command tunnel benchmarks the tether data path on loopback against a
// direct connection, in one run: bulk throughput (1 and 8 streams),
// request/response latency on a kept connection, and the rate of
// connect+request+close; then the registration rate of one large
// handshake and the PS's memory per endpoint. It starts its own
// redis-server, two PS nodes and an agent in this process.
//
//	go run ./test/bench/tunnel [-d 3s] [-windows 262144,1048576,4194304,16777216]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/test/bench/benchutil"
	"github.com/tether-net/tether/tunnel"
)

func main() {
	dur := flag.Duration("d", 3*time.Second, "duration of each throughput and rate measurement")
	windows := flag.String("windows", "", "comma-separated yamux stream windows (bytes) to compare on bulk throughput; empty = the default only")
	endpoints := flag.Int("endpoints", 10000, "endpoints in the registration measurement")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.StringVar(&only, "only", "", "run only the measurements whose name contains this (for profiling)")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		_ = pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	if err := run(*dur, *windows, *endpoints); err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type row struct {
	metric         string
	direct, tether float64
	unit           string
	higherIsBetter bool
}

func run(dur time.Duration, windowList string, nEndpoints int) error {
	redisURL, stopRedis, err := benchutil.StartRedis()
	if err != nil {
		return err
	}
	defer stopRedis()

	bulk, err := serve(bulkServer)
	if err != nil {
		return err
	}
	echo, err := serve(echoServer)
	if err != nil {
		return err
	}
	rpc, err := serve(oneShotServer)
	if err != nil {
		return err
	}

	fmt.Printf("tether tunnel benchmark: loopback, GOMAXPROCS=%d, %v per measurement, stream window %d KiB\n\n",
		runtime.GOMAXPROCS(0), dur, tunnel.DefaultStreamWindow>>10)
	// Registration first, on a quiet process, so the memory figure is not
	// blurred by buffers of the data-path measurements being freed.
	if err := registration(redisURL, nEndpoints); err != nil {
		return err
	}
	fmt.Println()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	env, err := startTether(ctx, redisURL, tunnel.DefaultStreamWindow, bulk, echo, rpc)
	if err != nil {
		return err
	}
	defer env.stop()

	var rows []row
	measure := func(name, unit string, higher bool, f func(addr string) (float64, error), direct, via string) error {
		if only != "" && !strings.Contains(name, only) {
			return nil
		}
		d, err := f(direct)
		if err != nil {
			return fmt.Errorf("%s direct: %w", name, err)
		}
		v, err := f(via)
		if err != nil {
			return fmt.Errorf("%s via tether: %w", name, err)
		}
		rows = append(rows, row{name, d, v, unit, higher})
		return nil
	}
	if err := measure("bulk, 1 stream", "MiB/s", true, func(a string) (float64, error) { return bulkRate(a, 1, dur) }, bulk, env.bulk); err != nil {
		return err
	}
	if err := measure("bulk, 8 streams", "MiB/s", true, func(a string) (float64, error) { return bulkRate(a, 8, dur) }, bulk, env.bulk); err != nil {
		return err
	}
	var lat [2][]time.Duration
	for i, a := range []string{echo, env.echo} {
		if only != "" && !strings.Contains("req/resp", only) {
			break
		}
		if lat[i], err = pingPong(a, dur); err != nil {
			return fmt.Errorf("request/response: %w", err)
		}
	}
	if len(lat[1]) > 0 {
		rows = append(rows,
			row{"req/resp p50 (kept conn)", us(pct(lat[0], 50)), us(pct(lat[1], 50)), "µs", false},
			row{"req/resp p99 (kept conn)", us(pct(lat[0], 99)), us(pct(lat[1], 99)), "µs", false},
			row{"req/resp rate (kept conn)", float64(len(lat[0])) / dur.Seconds(), float64(len(lat[1])) / dur.Seconds(), "req/s", true})
	}
	if err := measure("connect+request+close, 8 clients", "conn/s", true, func(a string) (float64, error) { return connectRate(a, 8, dur) }, rpc, env.rpc); err != nil {
		return err
	}
	printTable(rows)

	if windowList != "" {
		fmt.Println("\nbulk throughput by yamux stream window (1 stream / 8 streams, MiB/s):")
		for _, w := range strings.Split(windowList, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(w))
			if err != nil {
				return fmt.Errorf("-windows: %w", err)
			}
			wctx, wcancel := context.WithCancel(ctx)
			wenv, err := startTether(wctx, redisURL, uint32(n), bulk, echo, rpc)
			if err != nil {
				wcancel()
				return err
			}
			one, err1 := bulkRate(wenv.bulk, 1, dur)
			eight, err2 := bulkRate(wenv.bulk, 8, dur)
			wenv.stop()
			wcancel()
			if err := errors.Join(err1, err2); err != nil {
				return err
			}
			fmt.Printf("  %6d KiB  %8.0f  %8.0f\n", n>>10, one, eight)
		}
	}
	return nil
}

var only string

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func printTable(rows []row) {
	fmt.Printf("%-34s %14s %14s %8s\n", "metric", "direct", "via tether", "ratio")
	for _, r := range rows {
		ratio := r.tether / r.direct
		note := ""
		if !r.higherIsBetter {
			ratio = r.direct / r.tether // as a speed: 1.0 = as fast as direct
			note = " (direct/tether)"
		}
		fmt.Printf("%-34s %10.1f %-3s %10.1f %-3s %7.2fx%s\n", r.metric, r.direct, unitShort(r.unit), r.tether, unitShort(r.unit), ratio, note)
	}
}

func unitShort(u string) string {
	if len(u) > 3 {
		return u[:3]
	}
	return u
}

// ---- the tether side --------------------------------------------------------

type tetherEnv struct {
	bulk, echo, rpc string // PS addresses of the three endpoints
	stop            func()
}

var rangeNext atomic.Int32

func init() { rangeNext.Store(30000) }

// startTether starts two PS nodes and an agent exposing the three servers,
// and returns the first PS's address for each endpoint.
func startTether(ctx context.Context, redisURL string, window uint32, bulk, echo, rpc string) (*tetherEnv, error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var pss []*ps.PS
	var addrs []string
	quiet := slog.New(slog.DiscardHandler)
	for i := range 2 {
		cfg := ps.DefaultConfig()
		cfg.ID = fmt.Sprintf("bench-ps%d-%d", i, rangeNext.Load())
		cfg.Listen = "127.0.0.1:0"
		cfg.Advertise = "127.0.0.1"
		lo := int(rangeNext.Add(100)) - 100
		cfg.Ports = fmt.Sprintf("%d-%d", lo, lo+99)
		cfg.Redis = redisURL
		cfg.StreamWindow = int(window)
		cfg.Logger = quiet
		ps, err := ps.New(cfg)
		if err != nil {
			cancel()
			return nil, err
		}
		wg.Add(1)
		go func() { defer wg.Done(); _ = ps.Run(ctx) }()
		a, err := ps.Addr(ctx)
		if err != nil {
			cancel()
			return nil, err
		}
		pss = append(pss, ps)
		addrs = append(addrs, a.String())
	}
	acfg := agent.DefaultConfig()
	acfg.ID = fmt.Sprintf("bench-agent-%d", rangeNext.Load())
	acfg.IP = "127.77.0.1"
	acfg.Servers = addrs
	acfg.Expose = []string{"1=" + bulk, "2=" + echo, "3=" + rpc}
	acfg.StreamWindow = int(window)
	acfg.Logger = quiet
	ag, err := agent.New(acfg)
	if err != nil {
		cancel()
		return nil, err
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = ag.Run(ctx) }()
	stop := func() {
		cancel()
		wg.Wait()
		for _, ps := range pss {
			_ = ps.Close()
		}
	}
	reg, err := registry.New(registry.Config{URL: redisURL})
	if err != nil {
		stop()
		return nil, err
	}
	defer reg.Close()
	env := &tetherEnv{stop: stop}
	for port, dst := range map[uint16]*string{1: &env.bulk, 2: &env.echo, 3: &env.rpc} {
		target := netip.AddrPortFrom(netip.MustParseAddr("127.77.0.1"), port)
		deadline := time.Now().Add(15 * time.Second)
		for {
			rt, err := reg.Get(ctx, target)
			if err == nil && len(rt.Backends) == 2 {
				*dst = rt.Backends[0].Address.String()
				break
			}
			if time.Now().After(deadline) {
				stop()
				return nil, fmt.Errorf("route %s did not get two backends: %v", target, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return env, nil
}

// ---- servers ------------------------------------------------------------------

func serve(handle func(net.Conn)) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return ln.Addr().String(), nil
}

var zeros = make([]byte, 256<<10)

// bulkServer streams zeros to the client until the client closes.
func bulkServer(c net.Conn) {
	for {
		if _, err := c.Write(zeros); err != nil {
			return
		}
	}
}

// echoServer echoes every read.
func echoServer(c net.Conn) { _, _ = io.CopyBuffer(c, c, make([]byte, 4096)) }

// oneShotServer reads one request line, answers, and closes: a tiny RPC.
func oneShotServer(c net.Conn) {
	buf := make([]byte, 64)
	if _, err := io.ReadFull(c, buf[:16]); err != nil {
		return
	}
	_, _ = c.Write(buf[:32])
}

// ---- clients ------------------------------------------------------------------

// bulkRate downloads from addr over n connections for d; MiB/s.
func bulkRate(addr string, n int, d time.Duration) (float64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, n)
	stop := time.Now().Add(d)
	// Warm up the connection (and yamux windows) before timing.
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errc <- err
				return
			}
			defer c.Close()
			buf := make([]byte, 256<<10)
			_ = c.SetDeadline(stop.Add(5 * time.Second))
			for time.Now().Before(stop) {
				k, err := c.Read(buf)
				total.Add(int64(k))
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return 0, err
	}
	return float64(total.Load()) / (1 << 20) / time.Since(start).Seconds(), nil
}

// pingPong sends 64-byte requests on one kept connection and waits for each
// echo, for d; it returns every round trip.
func pingPong(addr string, d time.Duration) ([]time.Duration, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	req := make([]byte, 64)
	resp := make([]byte, 64)
	var out []time.Duration
	stop := time.Now().Add(d)
	for i := 0; time.Now().Before(stop); i++ {
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, err
		}
		if i >= 100 { // skip the warm-up
			out = append(out, time.Since(t0))
		}
	}
	return out, nil
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, len(s)*p/100)]
}

// connectRate runs n clients that each connect, send a request, read the
// answer and close, for d; connections per second.
func connectRate(addr string, n int, d time.Duration) (float64, error) {
	var done atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, n)
	stop := time.Now().Add(d)
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := make([]byte, 16)
			resp := make([]byte, 32)
			for time.Now().Before(stop) {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					errc <- err
					return
				}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				_, err = c.Write(req)
				if err == nil {
					_, err = io.ReadFull(c, resp)
				}
				c.Close()
				if err != nil {
					errc <- err
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return 0, err
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// ---- registration -------------------------------------------------------------

// registration measures one handshake exposing n endpoints against a fresh
// PS: endpoints per second (allocation, n listeners, the batched publish
// and the welcome), and the PS's heap and stack growth per endpoint.
func registration(redisURL string, n int) error {
	cfg := ps.DefaultConfig()
	cfg.ID = "bench-reg"
	cfg.Listen = "127.0.0.1:0"
	cfg.Advertise = "127.0.0.1"
	cfg.Ports = fmt.Sprintf("%d-%d", 40000, 40000+n+2000-1)
	cfg.Redis = redisURL
	cfg.Logger = slog.New(slog.DiscardHandler)
	ps, err := ps.New(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = ps.Run(ctx); close(done) }()
	defer func() { cancel(); <-done; _ = ps.Close() }()
	addr, err := ps.Addr(ctx)
	if err != nil {
		return err
	}
	hello := &tunnel.Hello{AgentID: "bench-many", AgentIP: netip.MustParseAddr("127.78.0.1"), Epoch: 1}
	for i := range n {
		hello.Endpoints = append(hello.Endpoints, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 78, byte(i >> 8), byte(i)}), 9100))
	}
	before := memNow()
	start := time.Now()
	conn, err := net.Dial("tcp", addr.String())
	if err != nil {
		return err
	}
	s, err := tunnel.Handshake(ctx, conn, hello, tunnel.ClientConfig{Timeout: 60 * time.Second})
	if err != nil {
		return fmt.Errorf("registration handshake: %w", err)
	}
	took := time.Since(start)
	defer s.Close()
	ok := 0
	for _, r := range s.Welcome.Endpoints {
		if r.Port != 0 {
			ok++
		}
	}
	after := memNow()
	fmt.Printf("registration: %d endpoints in one handshake (%d accepted) in %v = %.0f endpoints/s\n",
		n, ok, took.Round(time.Millisecond), float64(ok)/took.Seconds())
	fmt.Printf("ps memory per endpoint: %.1f KiB (heap %+.1f MiB, goroutine stacks %+.1f MiB, in-process, after GC)\n",
		float64(after-before)/1024/float64(max(ok, 1)), float64(heapDelta)/(1<<20), float64(stackDelta)/(1<<20))
	return nil
}

var heapDelta, stackDelta int64
var lastHeap, lastStack int64

func memNow() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	h, s := int64(m.HeapAlloc), int64(m.StackInuse)
	if lastHeap != 0 {
		heapDelta, stackDelta = h-lastHeap, s-lastStack
	}
	lastHeap, lastStack = h, s
	return h + s
}

// Command tunnel benchmarks the tether data path on loopback against a
// direct connection, in one run: bulk throughput (1 and 8 streams),
// request/response latency on a kept connection, and the rate of
// connect+request+close; then the registration rate of one large
// handshake and the PS's memory per endpoint; then connect+request+close
// and bulk through each of the PS's two data planes (a socket per port,
// and sk_lookup steering every port to one socket). It starts its own
// redis-server, PS nodes and agents in this process.
//
// As root it runs in a network namespace of its own (it starts itself
// again there): the sk_lookup plane attaches BPF to the whole namespace,
// never the machine's. Without root it runs where it is, without the
// sk_lookup rows.
//
// Every run also checks what holds on any machine, however loaded (each
// figure positive and finite, every row measured, echoed bytes as sent,
// every endpoint registered with a port) and exits 1 when a check fails.
// -smoke makes the same run in seconds, with tiny durations and sizes.
//
//	go run ./test/bench/tunnel [-smoke] [-d 3s] [-windows 262144,1048576,4194304,16777216]
package main

import (
	"bytes"
	"context"
	"encoding/binary"
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
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/test/bench/benchutil"
	"github.com/tether-net/tether/tunnel"
)

type config struct {
	dur        time.Duration
	windows    string
	endpoints  int
	cpuprofile string
}

func main() {
	var cfg config
	flag.DurationVar(&cfg.dur, "d", 3*time.Second, "duration of each throughput and rate measurement")
	flag.StringVar(&cfg.windows, "windows", "", "comma-separated yamux stream windows (bytes) to compare on bulk throughput; empty = the default only")
	flag.IntVar(&cfg.endpoints, "endpoints", 10000, "endpoints in the registration measurement")
	flag.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.StringVar(&only, "only", "", "run only the measurements whose name contains this (for profiling)")
	smoke := flag.Bool("smoke", false, "the same run in seconds (tiny durations and sizes, every check), for CI")
	flag.Parse()
	chk := benchutil.NewChecks("bench/tunnel")
	if *smoke {
		// One window besides the default, so the -windows path runs too.
		if err := benchutil.SmokeDefaults(flag.CommandLine, map[string]string{"d": "250ms", "endpoints": "1000", "windows": "262144"}); err != nil {
			chk.Finish(err)
		}
	}
	os.Exit(testutil.MainInPrivateNetns(func() int {
		if cfg.cpuprofile != "" {
			f, err := os.Create(cfg.cpuprofile)
			if err != nil {
				chk.Finish(err)
			}
			_ = pprof.StartCPUProfile(f)
		}
		err := run(cfg, chk)
		pprof.StopCPUProfile()
		chk.Finish(err)
		return 0
	}))
}

type row struct {
	metric         string
	direct, tether float64
	unit           string
	higherIsBetter bool
}

// servers are the addresses of the three test services: direct, or the
// first PS's ports for them.
type servers struct{ bulk, echo, rpc string }

func run(cfg config, chk *benchutil.Checks) error {
	redisURL, stopRedis, err := benchutil.StartRedis()
	if err != nil {
		return err
	}
	defer stopRedis()
	direct, err := startServers()
	if err != nil {
		return err
	}

	fmt.Printf("tether tunnel benchmark: loopback, GOMAXPROCS=%d, %v per measurement, stream window %d KiB\n\n",
		runtime.GOMAXPROCS(0), cfg.dur, tunnel.DefaultStreamWindow>>10)
	// Registration first, on a quiet process, so the memory figure is not
	// blurred by buffers of the data-path measurements being freed.
	if err := registration(redisURL, cfg.endpoints, chk); err != nil {
		return err
	}
	fmt.Println()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	env, err := startTether(ctx, redisURL, tunnel.DefaultStreamWindow, direct, ps.DataPlaneListeners)
	if err != nil {
		return err
	}
	defer env.stop()
	rows, err := dataPath(cfg.dur, direct, env.servers, chk)
	if err != nil {
		return err
	}
	printTable(rows)
	for _, r := range rows {
		chk.Positive(r.metric+", direct", r.direct)
		chk.Positive(r.metric+", via tether", r.tether)
	}
	if err := dataPlanes(ctx, redisURL, cfg.dur, direct, env.servers, chk); err != nil {
		return err
	}
	return windowTable(ctx, redisURL, cfg, direct, chk)
}

var only string

func wanted(name string) bool { return only == "" || strings.Contains(name, only) }

// dataPath runs each data-path measurement (those -only selects) direct
// and via tether, and checks that each gave its rows.
func dataPath(d time.Duration, direct, via servers, chk *benchutil.Checks) ([]row, error) {
	bulk := func(n int) func(string) (float64, error) {
		return func(a string) (float64, error) { return bulkRate(a, n, d) }
	}
	conns := func(a string) (float64, error) { return connectRate(a, 8, d) }
	var rows []row
	for _, m := range []struct {
		name string
		rows int
		f    func() ([]row, error)
	}{
		{"bulk, 1 stream", 1, func() ([]row, error) { return pair("bulk, 1 stream", "MiB/s", true, bulk(1), direct.bulk, via.bulk) }},
		{"bulk, 8 streams", 1, func() ([]row, error) { return pair("bulk, 8 streams", "MiB/s", true, bulk(8), direct.bulk, via.bulk) }},
		{"req/resp", 3, func() ([]row, error) { return latency(direct.echo, via.echo, d) }},
		{"connect+request+close, 8 clients", 1, func() ([]row, error) {
			return pair("connect+request+close, 8 clients", "conn/s", true, conns, direct.rpc, via.rpc)
		}},
	} {
		if !wanted(m.name) {
			continue
		}
		r, err := m.f()
		if err != nil {
			return nil, err
		}
		chk.Equal(m.name+": rows measured", len(r), m.rows)
		rows = append(rows, r...)
	}
	return rows, nil
}

// pair measures f direct and via tether: one row.
func pair(name, unit string, higher bool, f func(addr string) (float64, error), direct, via string) ([]row, error) {
	d, err := f(direct)
	if err != nil {
		return nil, fmt.Errorf("%s direct: %w", name, err)
	}
	v, err := f(via)
	if err != nil {
		return nil, fmt.Errorf("%s via tether: %w", name, err)
	}
	return []row{{name, d, v, unit, higher}}, nil
}

// latency measures request/response on a kept connection, direct and via
// tether: p50, p99 and rate.
func latency(direct, via string, d time.Duration) ([]row, error) {
	var lat [2][]time.Duration
	var took [2]time.Duration
	for i, a := range []string{direct, via} {
		var err error
		if lat[i], took[i], err = pingPong(a, d); err != nil {
			return nil, fmt.Errorf("request/response %s: %w", [2]string{"direct", "via tether"}[i], err)
		}
	}
	rate := func(i int) float64 { return float64(len(lat[i])) / took[i].Seconds() }
	return []row{
		{"req/resp p50 (kept conn)", us(pct(lat[0], 50)), us(pct(lat[1], 50)), "µs", false},
		{"req/resp p99 (kept conn)", us(pct(lat[0], 99)), us(pct(lat[1], 99)), "µs", false},
		{"req/resp rate (kept conn)", rate(0), rate(1), "req/s", true},
	}, nil
}

// windowTable compares bulk throughput over the stream windows of -windows,
// each on a fresh tether.
func windowTable(ctx context.Context, redisURL string, cfg config, direct servers, chk *benchutil.Checks) error {
	if cfg.windows == "" {
		return nil
	}
	fmt.Println("\nbulk throughput by yamux stream window (1 stream / 8 streams, MiB/s):")
	for _, w := range strings.Split(cfg.windows, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(w))
		if err != nil {
			return fmt.Errorf("-windows: %w", err)
		}
		wctx, wcancel := context.WithCancel(ctx)
		wenv, err := startTether(wctx, redisURL, uint32(n), direct, ps.DataPlaneListeners)
		if err != nil {
			wcancel()
			return err
		}
		one, err1 := bulkRate(wenv.bulk, 1, cfg.dur)
		eight, err2 := bulkRate(wenv.bulk, 8, cfg.dur)
		wenv.stop()
		wcancel()
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("window %d: %w", n, err)
		}
		chk.Positive(fmt.Sprintf("window %d KiB, bulk 1 stream", n>>10), one)
		chk.Positive(fmt.Sprintf("window %d KiB, bulk 8 streams", n>>10), eight)
		fmt.Printf("  %6d KiB  %8.0f  %8.0f\n", n>>10, one, eight)
	}
	return nil
}

// dataPlanes compares the PS's two data planes in one run:
// connect+request+close and bulk (1 stream), direct, through the PS pair
// with listeners (env, the rows above) and through a pair with sk_lookup,
// each as a ratio to direct, then sk_lookup against listeners. The
// sk_lookup plane attaches BPF to the whole network namespace, so it runs
// only in this run's own (see main).
func dataPlanes(ctx context.Context, redisURL string, d time.Duration, direct, listeners servers, chk *benchutil.Checks) error {
	const name = "data planes"
	if !wanted(name) {
		return nil
	}
	if !testutil.InPrivateNetns() {
		fmt.Println("\ndata planes: sk_lookup not measured: it needs root, to run in a network namespace of its own")
		return nil
	}
	sk, err := startTether(ctx, redisURL, tunnel.DefaultStreamWindow, direct, ps.DataPlaneSKLookup)
	if err != nil {
		return fmt.Errorf("%s: the sk_lookup PS pair: %w", name, err)
	}
	defer sk.stop()
	fmt.Printf("\ndata planes: a socket per port (listeners) vs one socket steered by sk_lookup (median of %d rounds)\n", planeRounds)
	var rows []row
	var vs []string
	for _, m := range []struct {
		name, unit          string
		direct, lis, skAddr string
		f                   func(string) (float64, error)
	}{
		{"conn+req+close x8", "conn/s", direct.rpc, listeners.rpc, sk.rpc, func(a string) (float64, error) { return connectRate(a, 8, d) }},
		{"bulk, 1 stream", "MiB/s", direct.bulk, listeners.bulk, sk.bulk, func(a string) (float64, error) { return bulkRate(a, 1, d) }},
	} {
		// Rounds in alternating order, medians: on a small loaded machine
		// whichever runs first or last in a row is favoured otherwise.
		var runs [3][]float64 // direct, listeners, sk_lookup
		for round := range planeRounds {
			order := []int{0, 1, 2}
			if round%2 == 1 {
				order = []int{2, 1, 0}
			}
			for _, i := range order {
				v, err := m.f([]string{m.direct, m.lis, m.skAddr}[i])
				if err != nil {
					return fmt.Errorf("%s, %s: %w", name, [3]string{"direct", "listeners", "sk_lookup"}[i], err)
				}
				runs[i] = append(runs[i], v)
			}
		}
		var got [3]float64
		for i := range got {
			got[i] = median(runs[i])
		}
		rows = append(rows, row{m.name + ", listeners", got[0], got[1], m.unit, true}, row{m.name + ", sk_lookup", got[0], got[2], m.unit, true})
		vs = append(vs, fmt.Sprintf("%s %.2fx", m.name, got[2]/got[1]))
	}
	printTable(rows)
	fmt.Printf("sk_lookup / listeners: %s\n", strings.Join(vs, ", "))
	for _, r := range rows {
		chk.Positive(name+": "+r.metric+", direct", r.direct)
		chk.Positive(name+": "+r.metric+", via tether", r.tether)
	}
	return nil
}

// planeRounds is how many times dataPlanes measures each plane.
const planeRounds = 3

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

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
	servers // the first PS's ports for the three endpoints
	stop    func()
}

var rangeNext atomic.Int32

func init() { rangeNext.Store(30000) }

// envNext numbers the environments: each agent exposes its endpoints on
// an address of its own, so environments that overlap (the data-plane
// and window comparisons start one while the first runs) never claim the
// same targets.
var envNext atomic.Int32

// startTether starts two PS nodes with the data plane plane and an agent
// exposing the three servers, and returns the first PS's address for each
// endpoint once the registry holds both backends of each.
func startTether(ctx context.Context, redisURL string, window uint32, direct servers, plane string) (*tetherEnv, error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var pss []*ps.PS
	stop := func() {
		cancel()
		wg.Wait()
		for _, ps := range pss {
			_ = ps.Close()
		}
	}
	var addrs []string
	quiet := slog.New(slog.DiscardHandler)
	for i := range 2 {
		cfg := ps.DefaultConfig()
		cfg.ID = fmt.Sprintf("bench-ps%d-%d", i, rangeNext.Load())
		cfg.Listen = "127.0.0.1:0"
		cfg.Advertise = []string{"127.0.0.1"}
		cfg.DataPlane = plane
		lo := int(rangeNext.Add(100)) - 100
		cfg.Ports = fmt.Sprintf("%d-%d", lo, lo+99)
		cfg.Redis = redisURL
		cfg.StreamWindow = int(window)
		cfg.Logger = quiet
		if err := benchutil.PSCredentials(&cfg); err != nil {
			stop()
			return nil, err
		}
		p, err := ps.New(cfg)
		if err != nil {
			stop()
			return nil, err
		}
		pss = append(pss, p)
		wg.Add(1)
		go func() { defer wg.Done(); _ = p.Run(ctx) }()
		a, err := p.Addr(ctx)
		if err != nil {
			stop()
			return nil, err
		}
		addrs = append(addrs, a.String())
	}
	acfg := agent.DefaultConfig()
	acfg.ID = fmt.Sprintf("bench-agent-%d", rangeNext.Load())
	agentIP := netip.AddrFrom4([4]byte{127, 77, 0, byte(envNext.Add(1))})
	acfg.IP = agentIP.String()
	acfg.Servers = addrs
	acfg.Expose = []string{"1=" + direct.bulk, "2=" + direct.echo, "3=" + direct.rpc}
	acfg.StreamWindow = int(window)
	acfg.Logger = quiet
	acfg.Token = benchutil.Token
	ag, err := agent.New(acfg)
	if err != nil {
		stop()
		return nil, err
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = ag.Run(ctx) }()
	env := &tetherEnv{stop: stop}
	if err := waitBackends(ctx, redisURL, agentIP, &env.servers); err != nil {
		stop()
		return nil, err
	}
	return env, nil
}

// waitBackends waits until the registry holds two backends for each of the
// three endpoints of the agent at agentIP and sets via to the first PS's
// ports.
func waitBackends(ctx context.Context, redisURL string, agentIP netip.Addr, via *servers) error {
	reg, err := registry.New(registry.Config{URL: redisURL})
	if err != nil {
		return err
	}
	defer reg.Close()
	for port, dst := range map[uint16]*string{1: &via.bulk, 2: &via.echo, 3: &via.rpc} {
		target := netip.AddrPortFrom(agentIP, port)
		deadline := time.Now().Add(15 * time.Second)
		for {
			rt, err := reg.Get(ctx, target)
			if err == nil && len(rt.Backends) == 2 {
				*dst = rt.Backends[0].Address.String()
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("route %s did not get two backends: %v", target, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// ---- servers ------------------------------------------------------------------

func startServers() (servers, error) {
	var s servers
	for _, x := range []struct {
		dst    *string
		handle func(net.Conn)
	}{{&s.bulk, bulkServer}, {&s.echo, echoServer}, {&s.rpc, oneShotServer}} {
		a, err := serve(x.handle)
		if err != nil {
			return s, err
		}
		*x.dst = a
	}
	return s, nil
}

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

// oneShotServer reads a 16-byte request, answers it and 16 zero bytes, and
// closes: a tiny RPC.
func oneShotServer(c net.Conn) {
	buf := make([]byte, 64)
	if _, err := io.ReadFull(c, buf[:16]); err != nil {
		return
	}
	_, _ = c.Write(buf[:32])
}

// ---- clients ------------------------------------------------------------------

// bulkRate downloads from addr over n connections for d; MiB/s. Each
// connection must carry data, and only zeros (checked on its first and
// last read, not to slow the stream down).
func bulkRate(addr string, n int, d time.Duration) (float64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, n)
	stop := time.Now().Add(d)
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := bulkStream(addr, stop)
			total.Add(got)
			if err != nil {
				errc <- err
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

// bulkStream reads one bulk connection until stop; bytes read.
func bulkStream(addr string, stop time.Time) (int64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	_ = c.SetDeadline(stop.Add(5 * time.Second))
	var got int64
	k := 0
	for first := true; first || time.Now().Before(stop); first = false {
		k, err = c.Read(buf)
		got += int64(k)
		if err != nil {
			return got, err
		}
		if first && !allZero(buf[:k]) {
			return got, errors.New("bulk stream: the first read carried non-zero bytes")
		}
	}
	if !allZero(buf[:k]) {
		return got, errors.New("bulk stream: the last read carried non-zero bytes")
	}
	if got == 0 {
		return 0, errors.New("bulk stream: a connection carried no data")
	}
	return got, nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// minSamples is the fewest request/response samples pingPong takes, past
// its warm-up, however short d.
const minSamples = 50

// pingPong sends 64-byte numbered requests on one kept connection and
// waits for each echo (which must be the same bytes), for d and at least
// minSamples; it returns every round trip past the warm-up, and the time
// they took.
func pingPong(addr string, d time.Duration) ([]time.Duration, time.Duration, error) {
	const warmup = 100
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(d + 30*time.Second))
	req := make([]byte, 64)
	resp := make([]byte, 64)
	var out []time.Duration
	var t1 time.Time
	stop := time.Now().Add(d)
	for i := 0; time.Now().Before(stop) || len(out) < minSamples; i++ {
		binary.BigEndian.PutUint64(req, uint64(i))
		t0 := time.Now()
		if i == warmup {
			t1 = t0
		}
		if _, err := c.Write(req); err != nil {
			return nil, 0, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, 0, err
		}
		if !bytes.Equal(req, resp) {
			return nil, 0, fmt.Errorf("echo of request %d: got %x, want %x", i, resp[:8], req[:8])
		}
		if i >= warmup {
			out = append(out, time.Since(t0))
		}
	}
	return out, time.Since(t1), nil
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
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop); i++ {
				if err := oneShot(addr, uint64(w)<<32|uint64(i)); err != nil {
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

// oneShot connects, sends request number id, checks the answer (the
// request, then 16 zero bytes) and closes.
func oneShot(addr string, id uint64) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	req := make([]byte, 16)
	resp := make([]byte, 32)
	binary.BigEndian.PutUint64(req, id)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(req); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, resp); err != nil {
		return err
	}
	if !bytes.Equal(resp[:16], req) || !allZero(resp[16:]) {
		return fmt.Errorf("answer to request %x: got %x", req, resp)
	}
	return nil
}

// ---- registration -------------------------------------------------------------

const regPorts = 40000 // first port of the registration PS

// registration measures one handshake exposing n endpoints against a fresh
// PS: endpoints per second (allocation, n listeners, the batched publish
// and the welcome), and the PS's heap and stack growth per endpoint. It
// checks that every endpoint came back with a port of the PS's range and
// is in the registry with that port.
func registration(redisURL string, n int, chk *benchutil.Checks) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, stop, err := startRegPS(ctx, redisURL, n)
	if err != nil {
		return err
	}
	defer stop()
	hello := &tunnel.Hello{AgentID: "bench-many", AgentIP: netip.MustParseAddr("127.78.0.1"), Token: benchutil.Token, Epoch: 1}
	for i := range n {
		hello.Endpoints = append(hello.Endpoints, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 78, byte(i >> 8), byte(i)}), 9100))
	}
	before := memNow()
	start := time.Now()
	conn, err := net.Dial("tcp", addr)
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
	rate, perEndpoint := float64(ok)/took.Seconds(), float64(after-before)/1024/float64(max(ok, 1))
	fmt.Printf("registration: %d endpoints in one handshake (%d accepted) in %v = %.0f endpoints/s\n",
		n, ok, took.Round(time.Millisecond), rate)
	fmt.Printf("ps memory per endpoint: %.1f KiB (heap %+.1f MiB, goroutine stacks %+.1f MiB, in-process, after GC)\n",
		perEndpoint, float64(heapDelta)/(1<<20), float64(stackDelta)/(1<<20))
	chk.Positive("registration endpoints/s", rate)
	chk.Positive("ps memory per endpoint", perEndpoint)
	return checkRegistered(ctx, redisURL, hello, s.Welcome, chk)
}

// startRegPS starts the registration PS, with ports for n endpoints.
func startRegPS(ctx context.Context, redisURL string, n int) (addr string, stop func(), err error) {
	cfg := ps.DefaultConfig()
	cfg.ID = "bench-reg"
	cfg.Listen = "127.0.0.1:0"
	cfg.Advertise = []string{"127.0.0.1"}
	cfg.DataPlane = ps.DataPlaneListeners
	cfg.Ports = fmt.Sprintf("%d-%d", regPorts, regPorts+n+2000-1)
	cfg.Redis = redisURL
	cfg.Logger = slog.New(slog.DiscardHandler)
	// One agent exposes all n endpoints: its credential's quota must hold
	// them (the default is half the range).
	cfg.CredEndpoints = n
	if err := benchutil.PSCredentials(&cfg); err != nil {
		return "", nil, err
	}
	p, err := ps.New(cfg)
	if err != nil {
		return "", nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = p.Run(ctx); close(done) }()
	stop = func() { cancel(); <-done; _ = p.Close() }
	a, err := p.Addr(ctx)
	if err != nil {
		stop()
		return "", nil, err
	}
	return a.String(), stop, nil
}

// checkRegistered checks that the welcome gave every endpoint of hello its
// own port of the PS's range, and that the registry holds each endpoint on
// that port.
func checkRegistered(ctx context.Context, redisURL string, hello *tunnel.Hello, w *tunnel.Welcome, chk *benchutil.Checks) error {
	n := len(hello.Endpoints)
	if !chk.Equal("welcome results", len(w.Endpoints), n) {
		return nil
	}
	reg, err := registry.New(registry.Config{URL: redisURL, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer reg.Close()
	inUse, err := reg.PortsInUse(ctx, "bench-reg")
	if err != nil {
		return fmt.Errorf("registry ports of the registration PS: %w", err)
	}
	accepted, wrong := 0, 0
	for i, r := range w.Endpoints {
		if r.Port == 0 {
			continue
		}
		accepted++
		if int(r.Port) < regPorts || int(r.Port) >= regPorts+n+2000 || inUse[netip.AddrPortFrom(w.PSAddr, r.Port)] != hello.Endpoints[i] {
			if wrong++; wrong == 1 {
				chk.Failf("endpoint %s: port %d, which the registry holds for %v", hello.Endpoints[i], r.Port, inUse[netip.AddrPortFrom(w.PSAddr, r.Port)])
			}
		}
	}
	chk.Equal("endpoints accepted with a port", accepted, n)
	chk.Equal("endpoints in the registry", len(inUse), n)
	chk.Equal("endpoints on a port the registry does not hold for them", wrong, 0)
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

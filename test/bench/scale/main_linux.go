// Command scale benchmarks one PS at the scale of issue 12: a real
// `tether ps` process with the sk_lookup data plane, four advertise
// addresses and 200,000 endpoints (20 agents x 10,000), its open-file
// limit at 20,000. It prints the registration time and rate, the PS's RSS
// and open files per endpoint, Redis memory per endpoint, a redirector's
// full sync of those routes, and the tail latency of a small agent's
// registration while a 10,000-endpoint one is in progress, next to the
// same on an idle PS; and today's figures (one socket per endpoint) beside
// them.
//
// It runs in a network namespace of its own, since sk_lookup steers a
// whole namespace: redis-server, the PS processes, the redirector and the
// in-process agents live and die there. It needs root.
//
// Every run also checks what holds on any machine, however loaded (every
// endpoint's route in Redis on a distinct (address, port) of the PS, a
// sample of endpoints spread over the range answering with their own
// agent's identity, the PS's open-file limit as asked, the redirector's
// map holding every route, each figure positive) and exits 1 when a check
// fails. -smoke makes the same run in seconds, with 2 addresses and 2,000
// endpoints.
//
//	go run ./test/bench/scale [-smoke] [-addrs 4] [-agents 20] [-per-agent 10000]
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/test/bench/benchutil"
	"github.com/tether-net/tether/tunnel"
)

type config struct {
	addrs     int    // advertise addresses of the PS
	agents    int    // agents of the scale run
	perAgent  int    // endpoints each exposes
	firstPort int    // first port of the PS's range on every address
	fdLimit   uint64 // the PS's open-file limit (soft and hard)
	sample    int    // endpoints asked for their identity
	tries     int    // small registrations timed, idle and busy each
	big       int    // endpoints of the registration in progress
	small     int    // endpoints of the small registration
	timeout   time.Duration
}

func main() {
	var cfg config
	flag.IntVar(&cfg.addrs, "addrs", 4, "advertise addresses of the PS (127.0.0.2, .3, ...); the endpoints are spread over them")
	flag.IntVar(&cfg.agents, "agents", 20, "agents of the scale run")
	flag.IntVar(&cfg.perAgent, "per-agent", 10000, "endpoints each agent exposes")
	flag.IntVar(&cfg.firstPort, "first-port", 10000, "first port of the PS's range (the range holds exactly agents x per-agent / addrs ports)")
	flag.Uint64Var(&cfg.fdLimit, "fd-limit", 20000, "open-file limit (soft and hard) of the PS process")
	flag.IntVar(&cfg.sample, "sample", 1000, "endpoints, spread over the range, asked for their agent's identity")
	flag.IntVar(&cfg.tries, "tries", 20, "small registrations timed on an idle PS, and as many during a big one")
	flag.IntVar(&cfg.big, "big", 10000, "endpoints of the registration in progress during the busy small ones")
	flag.IntVar(&cfg.small, "small", 10, "endpoints of the small registration")
	flag.DurationVar(&cfg.timeout, "timeout", 5*time.Minute, "how long the registration of all endpoints, or the redirector's sync, may take")
	smoke := flag.Bool("smoke", false, "the same run in seconds (2 addresses, 2,000 endpoints, every check), for CI")
	flag.Parse()
	chk := benchutil.NewChecks("bench/scale")
	if *smoke {
		if err := benchutil.SmokeDefaults(flag.CommandLine, map[string]string{
			"addrs": "2", "agents": "2", "per-agent": "1000", "sample": "200", "tries": "5", "big": "1000", "timeout": "30s",
		}); err != nil {
			chk.Finish(err)
		}
	}
	if os.Geteuid() != 0 {
		chk.Finish(errors.New("needs root: it runs in a network namespace of its own and loads sk_lookup and the redirector's eBPF programs"))
	}
	// The whole run happens in a fresh network namespace: this process
	// starts itself again there and waits.
	os.Exit(testutil.MainInPrivateNetns(func() int {
		chk.Finish(run(cfg, chk))
		return 0
	}))
}

// bench is one run: the tether binary, Redis and the credentials every
// process uses.
type bench struct {
	cfg      config
	chk      *benchutil.Checks
	bin, tmp string
	redisURL string
	tokens   string
}

func run(cfg config, chk *benchutil.Checks) error {
	// A PS with sk_lookup attaches to its whole network namespace: never
	// the machine's.
	if !testutil.InPrivateNetns() {
		return errors.New("not in a network namespace of its own: refusing to start a PS with sk_lookup in the machine's")
	}
	total := cfg.agents * cfg.perAgent
	if cfg.addrs < 1 || cfg.agents < 1 || cfg.perAgent < 1 || total%cfg.addrs != 0 {
		return fmt.Errorf("-agents %d x -per-agent %d must be a positive multiple of -addrs %d", cfg.agents, cfg.perAgent, cfg.addrs)
	}
	if cfg.firstPort+total/cfg.addrs-1 > 65535 || cfg.perAgent > 50000 {
		return fmt.Errorf("%d endpoints on %d addresses need ports %d-%d; at most 65535 (and at most 50,000 endpoints an agent)", total, cfg.addrs, cfg.firstPort, cfg.firstPort+total/cfg.addrs-1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	tmp, err := os.MkdirTemp("", "tether-bench-scale")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	b := &bench{cfg: cfg, chk: chk, tmp: tmp}
	if b.bin, err = testutil.BuildTether(tmp); err != nil {
		return err
	}
	var stopRedis func()
	if b.redisURL, stopRedis, err = benchutil.StartRedis(); err != nil {
		return err
	}
	defer stopRedis()
	var creds ps.Config
	if err := benchutil.PSCredentials(&creds); err != nil {
		return err
	}
	b.tokens = creds.TokenFile

	fmt.Printf("tether scale benchmark: one `tether ps` process (sk_lookup), %d advertise addresses, %d agents x %d endpoints, open-file limit %d; in a network namespace of its own\n\n",
		cfg.addrs, cfg.agents, cfg.perAgent, cfg.fdLimit)
	lat, err := b.registrationLatency(ctx)
	if err != nil {
		return fmt.Errorf("small registration latency: %w", err)
	}
	res, err := b.scale(ctx)
	if err != nil {
		return err
	}
	printTable(cfg, res, lat)
	return nil
}

// ---- the scale run --------------------------------------------------------------

// scaleResult holds the figures of the scale run.
type scaleResult struct {
	endpoints       int
	took            time.Duration
	fdLimit         uint64
	fdsBefore       int
	fdsAfter        int
	rssBefore       int64 // bytes
	rssAfter        int64
	heapBefore      float64 // Go heap in use, from the PS's metrics
	heapAfter       float64
	goroutines      [2]float64 // before, after
	redisBefore     int64
	redisAfter      int64
	sampled, wrong  int
	redirectorSync  time.Duration
	redirectorMap   int
	redirectorRoute int
}

// scale starts the PS with cfg.addrs addresses, registers every endpoint
// of cfg.agents agents, measures, checks the routes and a sample of
// endpoints, and times a redirector's full sync of the routes.
func (b *bench) scale(ctx context.Context) (*scaleResult, error) {
	cfg := b.cfg
	total := cfg.agents * cfg.perAgent
	perAddr := total / cfg.addrs
	var addrs []string
	for i := range cfg.addrs {
		addrs = append(addrs, netip.AddrFrom4([4]byte{127, 0, 0, byte(2 + i)}).String())
	}
	const psID = "scale-ps"
	node, err := b.startPS(ctx, psID, addrs, cfg.firstPort, perAddr, total)
	if err != nil {
		return nil, err
	}
	defer node.Stop(20 * time.Second)
	rdb, err := registry.New(registry.Config{URL: b.redisURL, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, err
	}
	defer rdb.Close()

	res := &scaleResult{endpoints: total}
	if res.fdLimit, err = openFileLimit(node.Pid()); err != nil {
		return nil, err
	}
	b.chk.True(res.fdLimit <= cfg.fdLimit, "the PS's open-file limit is %d, want at most %d", res.fdLimit, cfg.fdLimit)
	if res.rssBefore, err = settledRSS(ctx, node.Pid()); err != nil {
		return nil, err
	}
	res.fdsBefore, _ = openFDs(node.Pid())
	before, err := benchutil.Scrape(node.Metrics)
	if err != nil {
		return nil, err
	}
	res.heapBefore, res.goroutines[0] = before["go_memstats_heap_inuse_bytes"], before["go_goroutines"]
	if res.redisBefore, err = rdb.UsedMemory(ctx); err != nil {
		return nil, err
	}

	// The agents, in this process: each exposes perAgent ports of its own
	// address, all dialing its identity server.
	actx, stopAgents := context.WithCancel(ctx)
	var agents sync.WaitGroup
	defer func() { stopAgents(); agents.Wait() }()
	names := map[netip.Addr]string{}
	start := time.Now()
	for i := range cfg.agents {
		name := fmt.Sprintf("scale-agent-%d", i)
		ip := agentIP(i)
		names[ip] = name
		srv, err := identityServer(actx, name)
		if err != nil {
			return nil, err
		}
		a, err := newAgent(name, ip, node.tunnel, srv, cfg.perAgent)
		if err != nil {
			return nil, err
		}
		agents.Go(func() { _ = a.Run(actx); _ = a.Close() })
	}
	// All routes in Redis: the PS's port records (one per published
	// route) counted, cheap enough to poll; the full check reads every
	// route below.
	for {
		n, err := rdb.PortCount(ctx, psID)
		if err == nil && int(n) == total {
			break
		}
		if err := node.Exited(); err != nil {
			return nil, err
		}
		if time.Since(start) > cfg.timeout {
			return nil, fmt.Errorf("after %v, %d of %d routes are in Redis (%v)\n%s", cfg.timeout, n, total, err, node.LogTail())
		}
		time.Sleep(10 * time.Millisecond)
	}
	res.took = time.Since(start)
	fmt.Printf("registration: %d endpoints of %d agents in Redis after %v = %.0f endpoints/s\n", total, cfg.agents, res.took.Round(time.Millisecond), float64(total)/res.took.Seconds())

	if res.rssAfter, err = settledRSS(ctx, node.Pid()); err != nil {
		return nil, err
	}
	res.fdsAfter, _ = openFDs(node.Pid())
	after, err := benchutil.Scrape(node.Metrics)
	if err != nil {
		return nil, err
	}
	res.heapAfter, res.goroutines[1] = after["go_memstats_heap_inuse_bytes"], after["go_goroutines"]
	b.chk.Equal("endpoints the PS reports (tether_ps_endpoints)", int(after["tether_ps_endpoints"]), total)
	if res.redisAfter, err = rdb.UsedMemory(ctx); err != nil {
		return nil, err
	}
	b.chk.True(res.fdsAfter > 0 && res.fdsAfter < int(res.fdLimit), "the PS holds %d open files, want fewer than its limit %d", res.fdsAfter, res.fdLimit)

	b.chk.Positive("registration endpoints/s", float64(total)/res.took.Seconds())
	b.chk.Positive("PS RSS after registration", float64(res.rssAfter))
	b.chk.Positive("Redis memory per endpoint", float64(res.redisAfter-res.redisBefore)/float64(total))
	routes, err := b.checkRoutes(ctx, addrs, perAddr, total)
	if err != nil {
		return nil, err
	}
	res.sampled, res.wrong = b.askSample(routes, names)
	res.redirectorMap = total + total/2
	if res.redirectorSync, res.redirectorRoute, err = b.redirectorSync(ctx, total, res.redirectorMap); err != nil {
		return nil, fmt.Errorf("redirector: %w", err)
	}
	return res, nil
}

// agentIP is the address agent i exposes its endpoints on (in
// benchutil.AgentRange).
func agentIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 77, byte(10 + i/250), byte(1 + i%250)})
}

// newAgent makes an agent exposing n ports of ip, each dialing target.
func newAgent(id string, ip netip.Addr, server, target string, n int) (*agent.Agent, error) {
	acfg := agent.DefaultConfig()
	acfg.ID = id
	acfg.IP = ip.String()
	acfg.Servers = []string{server}
	acfg.Tunnels = 1
	acfg.Token = benchutil.Token
	// Thousands of endpoints in one handshake, many agents at once on two
	// cores: the default 10 s may not be enough.
	acfg.ConnectTimeout = 2 * time.Minute
	acfg.BackoffMin, acfg.BackoffMax = 50*time.Millisecond, time.Second
	acfg.Logger = slog.New(slog.DiscardHandler)
	acfg.Expose = make([]string, n)
	for k := range n {
		acfg.Expose[k] = fmt.Sprintf("%d=%s", 10000+k, target)
	}
	a, err := agent.New(acfg)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", id, err)
	}
	return a, nil
}

// checkRoutes reads every route and checks that each endpoint has one
// backend, on a distinct (address, port) of the PS's addresses and range,
// perAddr on each address.
func (b *bench) checkRoutes(ctx context.Context, addrs []string, perAddr, total int) ([]registry.Route, error) {
	reg, err := registry.New(registry.Config{URL: b.redisURL, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	routes, err := reg.List(ctx)
	if err != nil {
		return nil, err
	}
	b.chk.Equal("routes in the registry", len(routes), total)
	seen := make(map[netip.AddrPort]bool, len(routes))
	onAddr := map[netip.Addr]int{}
	bad := 0
	for _, r := range routes {
		if len(r.Backends) != 1 {
			if bad++; bad == 1 {
				b.chk.Failf("route %s has %d backends, want 1", r.Target, len(r.Backends))
			}
			continue
		}
		at := r.Backends[0].Address
		if seen[at] || !slices.Contains(addrs, at.Addr().String()) || int(at.Port()) < b.cfg.firstPort || int(at.Port()) >= b.cfg.firstPort+perAddr {
			if bad++; bad == 1 {
				b.chk.Failf("route %s on %s: taken twice, or not an address and port of the PS", r.Target, at)
			}
			continue
		}
		seen[at] = true
		onAddr[at.Addr()]++
	}
	b.chk.Equal("routes on a duplicate or foreign (address, port)", bad, 0)
	b.chk.Equal("distinct (address, port) pairs", len(seen), total)
	for _, a := range addrs {
		b.chk.Equal("routes on "+a, onAddr[netip.MustParseAddr(a)], perAddr)
	}
	return routes, nil
}

// askSample connects to cfg.sample endpoints spread evenly over the routes
// (sorted by target, so over every agent and port), 16 at a time, and
// checks that each answers with its own agent's name.
func (b *bench) askSample(routes []registry.Route, names map[netip.Addr]string) (asked, wrong int) {
	if len(routes) == 0 {
		return 0, 0
	}
	step := max(1, len(routes)/b.cfg.sample)
	jobs := make(chan registry.Route)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for r := range jobs {
				want := names[r.Target.Addr()]
				got, err := ask(r.Backends[0].Address.String())
				mu.Lock()
				asked++
				if err != nil || got != want {
					if wrong++; wrong == 1 {
						b.chk.Failf("endpoint %s via %s: got %q, %v; want %q", r.Target, r.Backends[0].Address, got, err, want)
					}
				}
				mu.Unlock()
			}
		})
	}
	for i := 0; i < len(routes) && i/step < b.cfg.sample; i += step {
		jobs <- routes[i]
	}
	close(jobs)
	wg.Wait()
	b.chk.Equal("sampled endpoints asked", asked, min(b.cfg.sample, len(routes)))
	b.chk.Equal("sampled endpoints that did not answer with their agent's identity", wrong, 0)
	return asked, wrong
}

// redirectorSync starts `tether redirector` on a cgroup made for this run
// (under the cgroup2 mount, never its root), with a pin directory of its
// own, and times its start to its route map holding want routes (its
// tether_redirector_routes gauge). It stops the redirector and removes
// its pins and the cgroup before returning.
func (b *bench) redirectorSync(ctx context.Context, want, mapSize int) (time.Duration, int, error) {
	mnt, err := cgroup2.Mount()
	if err != nil {
		return 0, 0, err
	}
	suffix := strconv.Itoa(os.Getpid())
	cg := filepath.Join(mnt, "tether-bench-scale-"+suffix)
	pin := "/sys/fs/bpf/tether-bench-scale-" + suffix
	if err := os.Mkdir(cg, 0o755); err != nil {
		return 0, 0, err
	}
	defer func() {
		if err := os.Remove(cg); err != nil {
			b.chk.Failf("remove the bench cgroup %s: %v", cg, err)
		}
	}()
	defer func() { _ = redirector.Uninstall(pin) }()
	metrics, err := benchutil.FreeAddr()
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	rd, err := b.startProcess(ctx, "redirector", metrics,
		"redirector", "--redis", b.redisURL, "--cgroup", cg, "--pin-dir", pin,
		"--target-cidrs", benchutil.AgentRange, "--map-size", strconv.Itoa(mapSize),
		"--metrics", metrics, "--log-level", "warn")
	if err != nil {
		return 0, 0, err
	}
	defer rd.Stop(10 * time.Second)
	var got float64
	var up time.Duration // start -> metrics answering: the process up, its programs installed
	for {
		m, err := benchutil.Scrape(metrics)
		if err == nil {
			if up == 0 {
				up = time.Since(start)
			}
			got = m["tether_redirector_routes"]
			if int(got) >= want {
				b.chk.Equal("redirector map full (tether_redirector_map_full)", int(m["tether_redirector_map_full"]), 0)
				break
			}
		}
		if err := rd.Exited(); err != nil {
			return 0, 0, err
		}
		if time.Since(start) > b.cfg.timeout {
			return 0, 0, fmt.Errorf("after %v its map holds %.0f of %d routes\n%s", b.cfg.timeout, got, want, rd.LogTail())
		}
		time.Sleep(10 * time.Millisecond)
	}
	took := time.Since(start)
	b.chk.Equal("routes in the redirector's map", int(got), want)
	b.chk.Positive("redirector full sync (s)", took.Seconds())
	fmt.Printf("redirector: started -> %d routes in its map (--map-size %d) in %v (up, programs installed, after %v)\n",
		int(got), mapSize, took.Round(time.Millisecond), up.Round(time.Millisecond))
	return took, int(got), nil
}

// ---- small registrations, idle and busy ---------------------------------------

// latencyResult holds the durations of the small registrations.
type latencyResult struct {
	idle, busy []time.Duration
	bigs       int // big registrations the busy ones overlapped
}

// registrationLatency times cfg.tries small registrations (cfg.small
// endpoints, a handshake each: connect to Welcome, which the PS sends
// after publishing) on an idle PS, then as many each started while a
// cfg.big-endpoint registration is in progress on the same PS. It runs
// its own PS process (same flags, two other addresses) before the scale
// run, so neither disturbs the other's figures.
func (b *bench) registrationLatency(ctx context.Context) (*latencyResult, error) {
	cfg := b.cfg
	const maxRounds = 8
	need := cfg.tries*cfg.small + maxRounds*(cfg.big+cfg.tries*cfg.small)
	perAddr := (need + 1) / 2
	node, err := b.startPS(ctx, "scale-lat", []string{"127.0.9.1", "127.0.9.2"}, cfg.firstPort, perAddr, need)
	if err != nil {
		return nil, err
	}
	defer node.Stop(10 * time.Second)
	res := &latencyResult{}
	seq := 0
	small := func() (time.Duration, error) {
		seq++
		h := hello(fmt.Sprintf("small-%d", seq), netip.AddrFrom4([4]byte{127, 78, byte(1 + seq/250), byte(1 + seq%250)}), cfg.small)
		start := time.Now()
		s, err := handshake(ctx, node.tunnel, h)
		took := time.Since(start)
		if err != nil {
			return 0, err
		}
		defer s.Close()
		return took, b.checkAccepted(h, s.Welcome)
	}
	for range cfg.tries {
		d, err := small()
		if err != nil {
			return nil, err
		}
		res.idle = append(res.idle, d)
	}
	for round := 0; len(res.busy) < cfg.tries && round < maxRounds; round++ {
		h := hello(fmt.Sprintf("big-%d", round), netip.AddrFrom4([4]byte{127, 79, byte(round), 1}), cfg.big)
		var done atomic.Bool
		bigErr := make(chan error, 1)
		go func() {
			s, err := handshake(ctx, node.tunnel, h)
			done.Store(true)
			if err == nil {
				err = b.checkAccepted(h, s.Welcome)
				_ = s.Close()
			}
			bigErr <- err
		}()
		// Let the big Hello reach the PS before the first small one.
		time.Sleep(20 * time.Millisecond)
		overlapped := false
		for !done.Load() && len(res.busy) < cfg.tries {
			d, err := small()
			if err != nil {
				<-bigErr
				return nil, err
			}
			res.busy = append(res.busy, d)
			overlapped = true
		}
		if overlapped {
			res.bigs++
		}
		if err := <-bigErr; err != nil {
			return nil, fmt.Errorf("the %d-endpoint registration: %w", cfg.big, err)
		}
	}
	b.chk.Equal("small registrations on an idle PS", len(res.idle), cfg.tries)
	b.chk.Equal("small registrations started while a big one was in progress", len(res.busy), cfg.tries)
	fmt.Printf("small registration (%d endpoints): idle p50 %v p99 %v; during a %d-endpoint one (%d of them) p50 %v p99 %v\n",
		cfg.small, pct(res.idle, 50), pct(res.idle, 99), cfg.big, res.bigs, pct(res.busy, 50), pct(res.busy, 99))
	return res, nil
}

// hello is agent id's Hello exposing n ports of ip.
func hello(id string, ip netip.Addr, n int) *tunnel.Hello {
	h := &tunnel.Hello{AgentID: id, AgentIP: ip, Token: benchutil.Token, Epoch: uint64(time.Now().UnixNano())}
	for k := range n {
		h.Endpoints = append(h.Endpoints, netip.AddrPortFrom(ip, uint16(10000+k)))
	}
	return h
}

func handshake(ctx context.Context, addr string, h *tunnel.Hello) (*tunnel.AgentSession, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	s, err := tunnel.Handshake(ctx, conn, h, tunnel.ClientConfig{Timeout: 2 * time.Minute})
	if err != nil {
		return nil, fmt.Errorf("handshake of %s (%d endpoints): %w", h.AgentID, len(h.Endpoints), err)
	}
	return s, nil
}

// checkAccepted checks that the Welcome gave every endpoint of h a port.
func (b *bench) checkAccepted(h *tunnel.Hello, w *tunnel.Welcome) error {
	ok := 0
	for _, r := range w.Endpoints {
		if r.Port != 0 {
			ok++
		}
	}
	if ok != len(h.Endpoints) {
		return fmt.Errorf("%s: %d of %d endpoints accepted with a port", h.AgentID, ok, len(h.Endpoints))
	}
	return nil
}

// ---- processes ------------------------------------------------------------------

// process is a tether process this run started (benchutil's), and a
// PS's tunnel listener.
type process struct {
	*benchutil.Process
	tunnel string // a PS's tunnel listener
}

// startPS starts a `tether ps` process with the sk_lookup data plane on
// addrs, ports first..first+perAddr-1 on each, its open-file limit at
// cfg.fdLimit, and waits until it is ready.
func (b *bench) startPS(ctx context.Context, id string, addrs []string, first, perAddr, credEndpoints int) (*process, error) {
	listen, err := benchutil.FreeAddr()
	if err != nil {
		return nil, err
	}
	metrics, err := benchutil.FreeAddr()
	if err != nil {
		return nil, err
	}
	args := []string{"ps", "--id", id, "--listen", listen, "--ports", fmt.Sprintf("%d-%d", first, first+perAddr-1),
		"--data-plane", ps.DataPlaneSKLookup, "--redis", b.redisURL,
		"--token-file", b.tokens, "--agent-cidrs", benchutil.AgentRange,
		"--credential-endpoints", strconv.Itoa(credEndpoints),
		// Agents of a real pool come from many hosts; here all come from
		// 127.0.0.1, which the per-source limit (8) would hold back.
		"--source-handshakes", "64",
		// A handshake of 10,000 endpoints among twenty on two cores.
		"--handshake-timeout", "2m",
		"--metrics", metrics, "--log-level", "warn"}
	for _, a := range addrs {
		args = append(args, "--advertise", a)
	}
	p, err := b.startProcess(ctx, id, metrics, args...)
	if err != nil {
		return nil, err
	}
	p.tunnel = listen
	// Soft and hard: the Go runtime raises its soft limit to the hard one
	// at start.
	lim := unix.Rlimit{Cur: b.cfg.fdLimit, Max: b.cfg.fdLimit}
	if err := unix.Prlimit(p.Pid(), unix.RLIMIT_NOFILE, &lim, nil); err != nil {
		p.Stop(time.Second)
		return nil, fmt.Errorf("set the open-file limit of %s to %d: %w", id, b.cfg.fdLimit, err)
	}
	if err := p.WaitReady(30 * time.Second); err != nil {
		p.Stop(time.Second)
		return nil, fmt.Errorf("%s: %w", id, err)
	}
	m, err := benchutil.Scrape(metrics)
	if err != nil {
		p.Stop(time.Second)
		return nil, err
	}
	b.chk.Equal(id+" runs the sk_lookup data plane (tether_ps_data_plane)", int(m[`tether_ps_data_plane{plane="sk_lookup"}`]), 1)
	return p, nil
}

// startProcess starts the tether binary with args, its output in a log
// file of the run's temporary directory (see benchutil.StartProcess).
func (b *bench) startProcess(ctx context.Context, name, metrics string, args ...string) (*process, error) {
	bp, err := benchutil.StartProcess(ctx, b.tmp, name, b.bin, args...)
	if err != nil {
		return nil, err
	}
	bp.Metrics = metrics
	return &process{Process: bp}, nil
}

// ---- reading processes and Redis -------------------------------------------------

// rss is the process's resident set (VmRSS), bytes.
func rss(pid int) (int64, error) {
	v, err := procField(pid, "status", "VmRSS:")
	if err != nil {
		return 0, err
	}
	kb, err := strconv.ParseInt(strings.TrimSuffix(v, " kB"), 10, 64)
	return kb << 10, err
}

// settledRSS waits until the process's RSS stays within 1% over three
// readings half a second apart (at most 20 s) and returns it.
func settledRSS(ctx context.Context, pid int) (int64, error) {
	deadline := time.Now().Add(20 * time.Second)
	prev, stable := int64(-1), 0
	for {
		cur, err := rss(pid)
		if err != nil {
			return 0, err
		}
		if prev > 0 && abs(cur-prev)*100 < cur {
			stable++
		} else {
			stable = 0
		}
		if stable >= 3 || time.Now().After(deadline) {
			return cur, nil
		}
		prev = cur
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// openFileLimit reads the soft "Max open files" of the process from
// /proc/PID/limits: the limit it really has.
func openFileLimit(pid int) (uint64, error) {
	v, err := procField(pid, "limits", "Max open files")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(v)
	if len(f) < 1 {
		return 0, fmt.Errorf("/proc/%d/limits: Max open files: %q", pid, v)
	}
	return strconv.ParseUint(f[0], 10, 64)
}

// procField returns what follows prefix on the first line of
// /proc/PID/file that starts with it, trimmed.
func procField(pid int, file, prefix string) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/%s", pid, file))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("/proc/%d/%s has no %q", pid, file, prefix)
}

func openFDs(pid int) (int, error) {
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(es), err
}

// ---- identity servers -------------------------------------------------------------

// identityServer answers every connection with name and closes it, until
// ctx ends: whoever connects learns which agent's target it reached.
func identityServer(ctx context.Context, name string) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.WriteString(c, name) }()
		}
	}()
	return ln.Addr().String(), nil
}

// ask connects to addr and returns what the server says before it closes.
func ask(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// ---- the table ------------------------------------------------------------------

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, len(s)*p/100)].Round(10 * time.Microsecond)
}

func printTable(cfg config, r *scaleResult, lat *latencyResult) {
	n := float64(r.endpoints)
	rate := n / r.took.Seconds()
	rssPer := float64(r.rssAfter-r.rssBefore) / n
	heapPer := (r.heapAfter - r.heapBefore) / n
	redisPer := float64(r.redisAfter-r.redisBefore) / n
	idle99, busy99 := pct(lat.idle, 99), pct(lat.busy, 99)
	fmt.Printf("\n== one PS, %d advertise addresses, %d endpoints (sk_lookup) ==\n", cfg.addrs, r.endpoints)
	fmt.Printf("%-38s %-34s %s\n", "metric", "today (issue 12, a socket each)", "this run")
	row := func(m, today, now string) { fmt.Printf("%-38s %-34s %s\n", m, today, now) }
	row("endpoints on one PS", "~19,000 (open-file limit 20,000)",
		fmt.Sprintf("%d on %d addresses; open-file limit %d, %d -> %d fds open", r.endpoints, cfg.addrs, r.fdLimit, r.fdsBefore, r.fdsAfter))
	row("registration", "~21,000 endpoints/s (10,000)",
		fmt.Sprintf("%.0f endpoints/s (%d agents x %d in %v)", rate, cfg.agents, cfg.perAgent, r.took.Round(time.Millisecond)))
	row("PS memory per endpoint", "3.2 KiB (heap+stacks, 10,000)",
		fmt.Sprintf("%.2f KiB RSS (%.1f -> %.1f MiB); Go heap in use %.2f KiB; goroutines %.0f -> %.0f",
			rssPer/1024, float64(r.rssBefore)/(1<<20), float64(r.rssAfter)/(1<<20), heapPer/1024, r.goroutines[0], r.goroutines[1]))
	row("Redis memory per endpoint", "-", fmt.Sprintf("%.0f B (used_memory %.1f -> %.1f MiB)", redisPer, float64(r.redisBefore)/(1<<20), float64(r.redisAfter)/(1<<20)))
	row("redirector full sync", "-", fmt.Sprintf("%v for %d routes (--map-size %d)", r.redirectorSync.Round(time.Millisecond), r.redirectorRoute, r.redirectorMap))
	row("sampled endpoints answering", "-", fmt.Sprintf("%d of %d with their agent's identity", r.sampled-r.wrong, r.sampled))
	row(fmt.Sprintf("small registration (%d endpoints), idle", cfg.small), "-",
		fmt.Sprintf("p50 %v  p99 %v  max %v  (%d tries)", pct(lat.idle, 50), idle99, pct(lat.idle, 100), len(lat.idle)))
	row(fmt.Sprintf("  while %d endpoints register", cfg.big), "-",
		fmt.Sprintf("p50 %v  p99 %v  max %v  (%d tries)  p99 busy/idle %.1fx", pct(lat.busy, 50), busy99, pct(lat.busy, 100), len(lat.busy), float64(busy99)/float64(max(idle99, 1))))
}

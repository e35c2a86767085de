// Command redirector benchmarks the eBPF redirector, each figure against a
// baseline measured in the same run: the cost of connect() to an address
// without a route in a cgroup with the programs attached vs one without; a
// full sync of 100,000 routes (Redis snapshot + map) and of 1,000,000 (map);
// and the time from a PS publishing a route to the route being in the map.
// It needs root; it creates its own cgroups and pin directory and removes
// them when done.
//
// Every run also checks what holds on any machine, however loaded (each
// figure positive and finite, the hook counted the connects it saw, every
// published or synced route is in the map with its backend) and exits 1
// when a check fails. -smoke makes the same run in seconds, with small
// route counts and few samples.
//
//	go run ./test/bench/redirector [-smoke] [-routes 100000] [-big 1000000]
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/test/bench/benchutil"
)

type config struct {
	big, routes, connects, samples int
}

// connectRounds is how many times the connect() cost is measured in each
// cgroup, alternating, so drift hits both alike.
const connectRounds = 5

// lookupRoutes is how many routes sit in the map while connect() is
// measured, so the lookup is a real one.
const lookupRoutes = 1000

func main() {
	if os.Getenv("BENCH_CHILD") == "connect" {
		os.Exit(connectChild())
	}
	var cfg config
	flag.IntVar(&cfg.big, "big", 1000000, "routes in the large map-only sync (0: skip it)")
	flag.IntVar(&cfg.routes, "routes", 100000, "routes in the full sync from Redis")
	flag.IntVar(&cfg.connects, "connects", 50000, "connect() calls per child in the connect cost measurement")
	flag.IntVar(&cfg.samples, "samples", 300, "routes published one by one in the publish -> in map measurement")
	smoke := flag.Bool("smoke", false, "the same run in seconds (small route counts, few samples, every check), for CI")
	flag.Parse()
	chk := benchutil.NewChecks("bench/redirector")
	if *smoke {
		if err := benchutil.SmokeDefaults(flag.CommandLine, map[string]string{"big": "1000", "routes": "1000", "connects": "2000", "samples": "30"}); err != nil {
			chk.Finish(err)
		}
	}
	if os.Geteuid() != 0 {
		chk.Finish(fmt.Errorf("needs root (BPF, cgroups)"))
	}
	chk.Finish(run(cfg, chk))
}

type row struct{ metric, base, value, ratio string }

// bench is one run: its cgroups, the installed programs and the route map.
type bench struct {
	cfg           config
	chk           *benchutil.Checks
	hooked, plain string // cgroups with and without the programs
	pin           string
	routes        *ebpf.Map
	rm            redirector.RouteMap
	rec           *redirector.Reconciler
	rows          []row
}

func run(cfg config, chk *benchutil.Checks) error {
	b := &bench{cfg: cfg, chk: chk}
	cleanup, err := b.install()
	defer cleanup()
	if err != nil {
		return err
	}
	if err := b.connectCost(); err != nil {
		return err
	}
	rd, stop, err := benchutil.StartRedis()
	if err != nil {
		return err
	}
	defer stop()
	reg, err := registry.New(registry.Config{URL: rd, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer reg.Close()
	if err := b.fullSync(reg); err != nil {
		return err
	}
	if err := b.bigSync(); err != nil {
		return err
	}
	if err := b.publishLatency(reg); err != nil {
		return err
	}
	fmt.Println("\n== redirector (eBPF) ==")
	fmt.Printf("%-42s %-18s %-40s %s\n", "metric", "baseline", "tether", "ratio")
	for _, r := range b.rows {
		fmt.Printf("%-42s %-18s %-40s %s\n", r.metric, r.base, r.value, r.ratio)
	}
	return nil
}

// install makes the two cgroups (under the cgroup2 mount, never its root)
// and installs the programs on the hooked one. The cleanup it returns,
// even with an error, undoes what was done.
func (b *bench) install() (cleanup func(), err error) {
	var undo []func()
	cleanup = func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	mnt, err := cgroup2.Mount()
	if err != nil {
		return cleanup, err
	}
	suffix := strconv.Itoa(os.Getpid())
	b.hooked = filepath.Join(mnt, "tether-bench-hooked-"+suffix)
	b.plain = filepath.Join(mnt, "tether-bench-plain-"+suffix)
	b.pin = "/sys/fs/bpf/tether-bench-" + suffix
	for _, d := range []string{b.hooked, b.plain} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return cleanup, err
		}
		undo = append(undo, func() { _ = os.Remove(d) })
	}
	undo = append(undo, func() { _ = redirector.Uninstall(b.pin) })
	in, err := redirector.Install(b.pin, b.hooked, uint32(max(b.cfg.big, b.cfg.routes+b.cfg.samples, lookupRoutes)+1000))
	if err != nil {
		return cleanup, err
	}
	undo = append(undo, func() { _ = in.Close() })
	if b.routes, err = ebpf.LoadPinnedMap(filepath.Join(b.pin, bpf.RedirectMapTetherRoutes), nil); err != nil {
		return cleanup, err
	}
	undo = append(undo, func() { _ = b.routes.Close() })
	b.rm = redirector.NewKernelRouteMap(b.routes)
	b.rec = redirector.NewReconciler(b.rm, nil, slog.New(slog.DiscardHandler),
		redirector.WithTargets(cidr.List{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("10.0.0.0/8")}))
	st, err := redirector.ReadStatus(b.pin)
	if err != nil {
		return cleanup, err
	}
	b.chk.True(len(st.Links) > 0, "installed redirector: no pinned links under %s", b.pin)
	return cleanup, nil
}

// connectCost measures connect() to an address without a route, with and
// without the hook, and checks that the hook saw every connect of the
// hooked children.
func (b *bench) connectCost() error {
	if err := b.rec.Replace(context.Background(), makeRoutes(lookupRoutes)); err != nil {
		return err
	}
	b.checkMapSize("routes for the connect() lookup", lookupRoutes)
	// A port nothing listens on: connect() is answered with a RST at once,
	// so the figure is the syscall path (where the hook runs), not accept().
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	closed := ln.Addr().String()
	ln.Close()
	var hookedNs, plainNs []float64
	var hookedSeen, plainSeen uint64 // connects the hook counted
	// Alternate, so drift hits both alike.
	for range connectRounds {
		p, seen, err := b.connectRound(b.plain, closed)
		if err != nil {
			return fmt.Errorf("connect() without the hook: %w", err)
		}
		plainNs, plainSeen = append(plainNs, p), plainSeen+seen
		h, seen, err := b.connectRound(b.hooked, closed)
		if err != nil {
			return fmt.Errorf("connect() with the hook: %w", err)
		}
		hookedNs, hookedSeen = append(hookedNs, h), hookedSeen+seen
	}
	want := uint64(connectRounds * b.cfg.connects)
	b.chk.True(hookedSeen >= want, "connect() with the hook: the hook counted %d connects without a route, want at least %d (did it run?)", hookedSeen, want)
	b.chk.True(plainSeen == 0, "connect() without the hook: the hook counted %d connects, want 0 (is the plain cgroup hooked?)", plainSeen)
	pm, hm := median(plainNs), median(hookedNs)
	b.chk.Positive("connect() cost without the hook (ns)", pm)
	b.chk.Positive("connect() cost with the hook (ns)", hm)
	b.rows = append(b.rows, row{"connect() to an address without a route", fmt.Sprintf("%.1f µs", pm/1000), fmt.Sprintf("%.1f µs", hm/1000), fmt.Sprintf("%.3f×", hm/pm)})
	return nil
}

// connectRound runs one connect child in cgroup: ns per connect, and how
// many connects the hook counted meanwhile (its no_route counter).
func (b *bench) connectRound(cgroup, addr string) (float64, uint64, error) {
	before, err := b.counter("no_route")
	if err != nil {
		return 0, 0, err
	}
	ns, err := connectChildIn(cgroup, addr, b.cfg.connects)
	if err != nil {
		return 0, 0, err
	}
	after, err := b.counter("no_route")
	if err != nil {
		return 0, 0, err
	}
	return ns, after - before, nil
}

// fullSync publishes cfg.routes routes and times a full sync of them from
// Redis into an empty map.
func (b *bench) fullSync(reg *registry.Registry) error {
	ctx := context.Background()
	if err := reg.RenewPS(ctx, registry.PSLease{ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: time.Now().Add(time.Hour)}); err != nil {
		return err
	}
	n := b.cfg.routes
	pubs := make([]registry.Publication, n)
	for i := range pubs {
		pubs[i] = registry.Publication{Target: target(i), Port: uint16(1024 + i%60000), AgentID: "a" + strconv.Itoa(i%1000)}
	}
	errs, err := reg.Publish(ctx, "ps1", pubs)
	if err != nil {
		return err
	}
	b.chk.Equal("publications refused", countErrs(errs), 0)
	if err := b.clearMap(); err != nil {
		return err
	}
	start := time.Now()
	snap, err := reg.Snapshot(ctx)
	if err != nil {
		return err
	}
	snapDur := time.Since(start)
	states := toStates(snap)
	mapStart := time.Now()
	if err := b.rec.Replace(ctx, states); err != nil {
		return err
	}
	total, mapDur := time.Since(start), time.Since(mapStart)
	b.chk.Equal("routes in the Redis snapshot", len(snap.Routes), n)
	b.checkMapSize("routes in the map after the full sync", n)
	b.chk.Positive("full sync duration (s)", total.Seconds())
	b.rows = append(b.rows, row{fmt.Sprintf("full sync %s routes (Redis + map)", thousands(n)), "aim 1 s", fmt.Sprintf("%.0f ms (redis %.0f ms, map %.0f ms)", ms(total), ms(snapDur), ms(mapDur)), fmt.Sprintf("%.2f× of aim", total.Seconds())})
	return nil
}

// bigSync times a map-only sync of cfg.big routes into an empty map.
func (b *bench) bigSync() error {
	if b.cfg.big <= 0 {
		return nil
	}
	if err := b.clearMap(); err != nil {
		return err
	}
	bigRoutes := makeRoutes(b.cfg.big)
	start := time.Now()
	if err := b.rec.Replace(context.Background(), bigRoutes); err != nil {
		return err
	}
	d := time.Since(start)
	b.checkMapSize("routes in the map after the map-only sync", b.cfg.big)
	b.chk.Positive("map-only sync routes/s", float64(b.cfg.big)/d.Seconds())
	b.rows = append(b.rows, row{fmt.Sprintf("full sync %s routes (map only)", thousands(b.cfg.big)), "-", fmt.Sprintf("%.0f ms", ms(d)), fmt.Sprintf("%.0f routes/s", float64(b.cfg.big)/d.Seconds())})
	return b.clearMap()
}

// publishLatency times cfg.samples routes, one by one, from a PS
// publishing each to its being in the map, through the real redirector
// sync (registry mirror + reconciler), and checks each entry's backend.
func (b *bench) publishLatency(reg *registry.Registry) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	mirror, err := registry.NewMirror(registry.MirrorConfig{Registry: reg, Sink: b.rec, Resync: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	go func() { _ = mirror.Run(ctx) }()
	<-mirror.Ready()
	want := netip.MustParseAddrPort("127.0.0.1:40000")
	var lat []float64
	wrong := 0
	for i := range b.cfg.samples {
		t := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 99, byte(i >> 8), byte(i)}), 80)
		key, _ := redirector.EncodeKey(t)
		start := time.Now()
		errs, err := reg.Publish(ctx, "ps1", []registry.Publication{{Target: t, Port: want.Port(), AgentID: "lat"}})
		if err != nil {
			return err
		}
		if err := countErr(errs); err != nil {
			return fmt.Errorf("publish %s: %w", t, err)
		}
		var v bpf.RedirectRouteValue
		for b.routes.Lookup(&key, &v) != nil {
			if time.Since(start) > 5*time.Second {
				return fmt.Errorf("route %s never reached the map", t)
			}
			time.Sleep(50 * time.Microsecond)
		}
		lat = append(lat, float64(time.Since(start).Microseconds())/1000)
		if got, state := redirector.DecodeBackend(v.Backends[0]); got != want || state != "live" {
			if wrong++; wrong == 1 {
				b.chk.Failf("route %s in the map: backend %v (%s), want %v (live)", t, got, state, want)
			}
		}
	}
	b.chk.Equal("published routes with a wrong backend in the map", wrong, 0)
	b.chk.Equal("publish -> in map samples", len(lat), b.cfg.samples)
	if len(lat) == 0 {
		return nil
	}
	sort.Float64s(lat)
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	b.chk.Positive("publish -> in map p50 (ms)", p50)
	b.chk.Positive("publish -> in map p99 (ms)", p99)
	b.rows = append(b.rows, row{"publish -> in map, p50", "aim p99 < 100 ms", fmt.Sprintf("%.2f ms", p50), ""})
	b.rows = append(b.rows, row{"publish -> in map, p99", "aim p99 < 100 ms", fmt.Sprintf("%.2f ms", p99), fmt.Sprintf("%.3f× of aim", p99/100)})
	return nil
}

// counter reads one of the redirector's counters.
func (b *bench) counter(name string) (uint64, error) {
	st, err := redirector.ReadStatus(b.pin)
	if err != nil {
		return 0, err
	}
	v, ok := st.Counters[name]
	if !ok {
		return 0, fmt.Errorf("redirector has no counter %q", name)
	}
	return v, nil
}

// clearMap deletes every route in the map and checks that none is left.
func (b *bench) clearMap() error {
	keys, err := b.rm.Keys()
	if err != nil {
		return err
	}
	if err := b.rm.Delete(keys); err != nil {
		return fmt.Errorf("clear the route map: %w", err)
	}
	b.checkMapSize("routes in the map after clearing it", 0)
	return nil
}

// checkMapSize checks that the route map holds want routes.
func (b *bench) checkMapSize(what string, want int) {
	keys, err := b.rm.Keys()
	if err != nil {
		b.chk.Failf("%s: %v", what, err)
		return
	}
	b.chk.Equal(what, len(keys), want)
}

func countErrs(errs []error) int {
	n := 0
	for _, e := range errs {
		if e != nil {
			n++
		}
	}
	return n
}

func countErr(errs []error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// thousands formats n with commas: 100,000.
func thousands(n int) string {
	s := strconv.Itoa(n)
	var out []string
	for len(s) > 3 {
		out = append([]string{s[len(s)-3:]}, out...)
		s = s[:len(s)-3]
	}
	return strings.Join(append([]string{s}, out...), ",")
}

func target(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 100 + byte(i>>24), byte(i >> 16), byte(i >> 8)}), uint16(1+i%256))
}

func makeRoutes(n int) []registry.RouteState {
	out := make([]registry.RouteState, n)
	for i := range out {
		out[i] = registry.RouteState{Target: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 9100),
			Backends: []registry.BackendState{
				{PSID: "ps1", Address: netip.MustParseAddrPort("127.0.0.1:20000"), Live: true},
				{PSID: "ps2", Address: netip.MustParseAddrPort("127.0.0.2:20000"), Live: true},
			}}
	}
	return out
}

func toStates(s registry.Snapshot) []registry.RouteState {
	now := time.Now()
	out := make([]registry.RouteState, 0, len(s.Routes))
	for _, r := range s.Routes {
		rs := registry.RouteState{Target: r.Target}
		for _, b := range r.Backends {
			rs.Backends = append(rs.Backends, registry.BackendState{PSID: b.PSID, Address: b.Address, AgentID: b.AgentID, Live: b.Live(now)})
		}
		out = append(out, rs)
	}
	return out
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// connectChildIn runs the connect loop (n connects) in a child started
// inside cgroup and returns ns per connect+close.
func connectChildIn(cgroup, addr string, n int) (float64, error) {
	f, err := os.Open(cgroup)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), "BENCH_CHILD=connect", "BENCH_ADDR="+addr, "BENCH_N="+strconv.Itoa(n))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("connect child: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

// connectChild connects and closes BENCH_N times with raw syscalls (no Go
// netpoller noise), each refused, and prints ns per iteration.
func connectChild() int {
	ap := netip.MustParseAddrPort(os.Getenv("BENCH_ADDR"))
	n, err := strconv.Atoi(os.Getenv("BENCH_N"))
	if err != nil || n <= 0 {
		fmt.Fprintln(os.Stderr, "connect child: bad BENCH_N:", os.Getenv("BENCH_N"))
		return 1
	}
	sa := &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	start := time.Now()
	for range n {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "connect child: socket:", err)
			return 1
		}
		if err := syscall.Connect(fd, sa); err != syscall.ECONNREFUSED {
			fmt.Fprintln(os.Stderr, "connect: want ECONNREFUSED, got", err)
			syscall.Close(fd)
			return 1
		}
		syscall.Close(fd)
	}
	fmt.Printf("%f\n", float64(time.Since(start).Nanoseconds())/float64(n))
	return 0
}

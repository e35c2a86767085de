// Command redirector benchmarks the eBPF redirector, each figure against a
// baseline measured in the same run: the cost of connect() to an address
// without a route in a cgroup with the programs attached vs one without; a
// full sync of 100,000 routes (Redis snapshot + map) and of 1,000,000 (map);
// and the time from a PS publishing a route to the route being in the map.
// It needs root; it creates its own cgroups and pin directory and removes
// them when done.
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
	"syscall"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/test/bench/benchutil"
)

func main() {
	if os.Getenv("BENCH_CHILD") == "connect" {
		os.Exit(connectChild())
	}
	big := flag.Int("big", 1000000, "routes in the large map-only sync")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench/redirector: needs root (BPF, cgroups)")
		os.Exit(1)
	}
	if err := run(*big); err != nil {
		fmt.Fprintln(os.Stderr, "bench/redirector:", err)
		os.Exit(1)
	}
}

type row struct{ metric, base, value, ratio string }

func run(big int) error {
	mnt, err := cgroup2.Mount()
	if err != nil {
		return err
	}
	suffix := strconv.Itoa(os.Getpid())
	hooked := filepath.Join(mnt, "tether-bench-hooked-"+suffix)
	plain := filepath.Join(mnt, "tether-bench-plain-"+suffix)
	pin := "/sys/fs/bpf/tether-bench-" + suffix
	for _, d := range []string{hooked, plain} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		defer os.Remove(d)
	}
	defer redirector.Uninstall(pin)

	in, err := redirector.Install(pin, hooked, uint32(max(big, 100000)+1000))
	if err != nil {
		return err
	}
	defer in.Close()
	routes, err := ebpf.LoadPinnedMap(filepath.Join(pin, bpf.RedirectMapTetherRoutes), nil)
	if err != nil {
		return err
	}
	defer routes.Close()
	rm := redirector.NewKernelRouteMap(routes)
	rec := redirector.NewReconciler(rm, nil, slog.New(slog.DiscardHandler))
	var rows []row

	// 1. connect() to an address without a route, with and without the hook.
	// A thousand routes sit in the map so the lookup is a real one.
	if err := rec.Replace(context.Background(), makeRoutes(1000)); err != nil {
		return err
	}
	// A port nothing listens on: connect() is answered with a RST at once,
	// so the figure is the syscall path (where the hook runs), not accept().
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	closed := ln.Addr().String()
	ln.Close()
	var hookedNs, plainNs []float64
	for range 5 { // alternate, so drift hits both alike
		p, err := connectCost(plain, closed)
		if err != nil {
			return err
		}
		h, err := connectCost(hooked, closed)
		if err != nil {
			return err
		}
		plainNs, hookedNs = append(plainNs, p), append(hookedNs, h)
	}
	pm, hm := median(plainNs), median(hookedNs)
	rows = append(rows, row{"connect() to an address without a route", fmt.Sprintf("%.1f µs", pm/1000), fmt.Sprintf("%.1f µs", hm/1000), fmt.Sprintf("%.3f×", hm/pm)})

	// 2. Full sync of 100,000 routes from Redis into the map.
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
	ctx := context.Background()
	if err := reg.RenewPS(ctx, registry.PSLease{ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: time.Now().Add(time.Hour)}); err != nil {
		return err
	}
	const n = 100000
	pubs := make([]registry.Publication, n)
	for i := range pubs {
		pubs[i] = registry.Publication{Target: target(i), Port: uint16(1024 + i%60000), AgentID: "a" + strconv.Itoa(i%1000)}
	}
	if _, err := reg.Publish(ctx, "ps1", pubs); err != nil {
		return err
	}
	_ = rm.Delete(mustKeys(rm))
	start := time.Now()
	snap, err := reg.Snapshot(ctx)
	if err != nil {
		return err
	}
	snapDur := time.Since(start)
	states := toStates(snap)
	mapStart := time.Now()
	if err := rec.Replace(ctx, states); err != nil {
		return err
	}
	total := time.Since(start)
	rows = append(rows, row{"full sync 100,000 routes (Redis + map)", "aim 1 s", fmt.Sprintf("%.0f ms (redis %.0f ms, map %.0f ms)", ms(total), ms(snapDur), ms(time.Since(mapStart))), fmt.Sprintf("%.2f× of aim", total.Seconds())})

	// 3. Map-only sync of a million routes.
	if big > 0 {
		_ = rm.Delete(mustKeys(rm))
		bigRoutes := makeRoutes(big)
		start = time.Now()
		if err := rec.Replace(ctx, bigRoutes); err != nil {
			return err
		}
		d := time.Since(start)
		rows = append(rows, row{fmt.Sprintf("full sync %d routes (map only)", big), "-", fmt.Sprintf("%.0f ms", ms(d)), fmt.Sprintf("%.0f routes/s", float64(big)/d.Seconds())})
		_ = rm.Delete(mustKeys(rm))
	}

	// 4. A route published by a PS to visible in the map, through the real
	// redirector sync (registry mirror + reconciler).
	mirror, err := registry.NewMirror(registry.MirrorConfig{Registry: reg, Sink: rec, Resync: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = mirror.Run(mctx) }()
	<-mirror.Ready()
	var lat []float64
	for i := range 300 {
		t := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 99, byte(i >> 8), byte(i)}), 80)
		key, _ := redirector.EncodeKey(t)
		start := time.Now()
		if _, err := reg.Publish(ctx, "ps1", []registry.Publication{{Target: t, Port: 40000, AgentID: "lat"}}); err != nil {
			return err
		}
		var v bpf.RedirectRouteValue
		for routes.Lookup(&key, &v) != nil {
			if time.Since(start) > 5*time.Second {
				return fmt.Errorf("route %s never reached the map", t)
			}
			time.Sleep(50 * time.Microsecond)
		}
		lat = append(lat, float64(time.Since(start).Microseconds())/1000)
	}
	sort.Float64s(lat)
	rows = append(rows, row{"publish -> in map, p50", "aim p99 < 100 ms", fmt.Sprintf("%.2f ms", lat[len(lat)/2]), ""})
	rows = append(rows, row{"publish -> in map, p99", "aim p99 < 100 ms", fmt.Sprintf("%.2f ms", lat[len(lat)*99/100]), fmt.Sprintf("%.3f× of aim", lat[len(lat)*99/100]/100)})

	fmt.Println("\n== redirector (eBPF) ==")
	fmt.Printf("%-42s %-18s %-40s %s\n", "metric", "baseline", "tether", "ratio")
	for _, r := range rows {
		fmt.Printf("%-42s %-18s %-40s %s\n", r.metric, r.base, r.value, r.ratio)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

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

func mustKeys(rm redirector.RouteMap) []bpf.RedirectRouteKey {
	k, _ := rm.Keys()
	return k
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// connectCost runs the connect loop in a child started inside cgroup and
// returns ns per connect+close.
func connectCost(cgroup, addr string) (float64, error) {
	f, err := os.Open(cgroup)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), "BENCH_CHILD=connect", "BENCH_ADDR="+addr)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("connect child: %w", err)
	}
	return strconv.ParseFloat(string(out[:len(out)-1]), 64)
}

// connectChild connects and closes many times with raw syscalls (no Go
// netpoller noise) and prints ns per iteration.
func connectChild() int {
	ap := netip.MustParseAddrPort(os.Getenv("BENCH_ADDR"))
	sa := &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	const n = 50000
	start := time.Now()
	for range n {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
		if err != nil {
			return 1
		}
		if err := syscall.Connect(fd, sa); err != syscall.ECONNREFUSED {
			fmt.Fprintln(os.Stderr, "connect: want ECONNREFUSED, got", err)
			syscall.Close(fd)
			return 1
		}
		syscall.Close(fd)
	}
	fmt.Printf("%f\n", float64(time.Since(start).Nanoseconds())/n)
	return 0
}

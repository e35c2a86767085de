// Command paths benchmarks tether's two data paths like for like, in one
// run on loopback: a direct connection, then `tether ps` and `tether
// agent` as real processes with credentials, on the multiplexed (yamux)
// path and on the pooled path (dedicated data connections spliced in the
// kernel), each with the tunnel in plain TCP and in TLS. With -frp DIR
// (frps and frpc binaries) it adds frp with its defaults (TLS) and with
// TLS off, configured as issue 14 describes.
//
// Rows: bulk up (1 and 8 streams) and down (8 streams) in Gbit/s, with the
// CPU the proxy's two processes used per Gbit carried (utime+stime from
// /proc over each measurement); request/response on 32 kept connections
// (req/s, p50, p99); connect+request+close by 16 concurrent clients
// (conn/s). The clients and the services live in this process; the
// clients dial the PS's data port directly, as read from the registry.
// Each cell is the median of -rounds rounds, the columns measured in
// alternating order (the first or last of a row is favoured otherwise on
// a small loaded machine), and is printed with its ratio to direct;
// pool/mux and tether/frp ratios follow the table.
//
// As root it runs in a network namespace of its own (it starts itself
// again there), the PS with its default sk_lookup data plane; without
// root, where it is, with --data-plane listeners.
//
// Every run also checks what holds on any machine, however loaded: each
// figure positive and finite, every uploaded byte counted by the sink,
// downloads only zeros, echoes as sent, every cell measured, and each
// tether column's connections carried on the path it names (the PS's
// tether_ps_data_path_total). It exits 1 when a check fails. -smoke makes
// the same run in seconds.
//
//	go run ./test/bench/paths [-smoke] [-d 2s] [-rounds 3] [-frp DIR]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/test/bench/benchutil"
)

type config struct {
	dur    time.Duration
	rounds int
	frpDir string
}

func main() {
	var cfg config
	flag.DurationVar(&cfg.dur, "d", 2*time.Second, "duration of each measurement")
	flag.IntVar(&cfg.rounds, "rounds", 3, "rounds per cell; each cell is their median")
	flag.StringVar(&cfg.frpDir, "frp", "", "directory with frps and frpc binaries: adds the frp columns (defaults with TLS, and TLS off)")
	smoke := flag.Bool("smoke", false, "the same run in seconds (tiny durations, one round, every check), for CI")
	flag.Parse()
	chk := benchutil.NewChecks("bench/paths")
	if *smoke {
		if err := benchutil.SmokeDefaults(flag.CommandLine, map[string]string{"d": "200ms", "rounds": "1"}); err != nil {
			chk.Finish(err)
		}
	}
	if cfg.rounds < 1 || cfg.dur <= 0 {
		chk.Finish(fmt.Errorf("-rounds %d and -d %v must be positive", cfg.rounds, cfg.dur))
	}
	if cfg.frpDir != "" {
		// The namespace child starts from the same working directory, but
		// an absolute path reads better in errors.
		abs, err := filepath.Abs(cfg.frpDir)
		if err != nil {
			chk.Finish(err)
		}
		cfg.frpDir = abs
	}
	os.Exit(testutil.MainInPrivateNetns(func() int {
		chk.Finish(run(cfg, chk))
		return 0
	}))
}

// column is one way from the clients to the services: direct, a tether
// PS+agent pair, or frps+frpc.
type column struct {
	name   string
	kind   string // "direct", "tether" or "frp"
	tls    bool
	pool   bool     // tether: the pooled data path
	na     string   // why the column is not measured ("" = it is)
	addrs  services // where the clients connect
	procs  []*process
	ps     *process // tether: the PS, for its path counters
	before map[string]float64
}

// cpuSeconds is the CPU time the column's proxy processes used so far.
func (c *column) cpuSeconds() (float64, error) {
	var sum float64
	for _, p := range c.procs {
		s, err := p.cpuSeconds()
		if err != nil {
			return 0, err
		}
		sum += s
	}
	return sum, nil
}

// logs is the end of each of the column's process logs, for an error
// message: a failed measurement usually shows why there (a tunnel that
// dropped, a process that died).
func (c *column) logs() string {
	var b strings.Builder
	for _, p := range c.procs {
		fmt.Fprintf(&b, "\n--- %s (pid %d) log:\n%s", p.Name, p.Pid(), p.LogTail())
		if err := p.Exited(); err != nil {
			b.WriteString("\n(exited)")
		}
	}
	return b.String()
}

// cell is one measurement (or the median of several).
type cell struct {
	value      float64 // Gbit/s, req/s or conn/s
	p50, p99   time.Duration
	cpuPerGbit float64 // bulk rows, proxy columns: CPU-seconds of the proxy's processes per Gbit carried
}

// test is one row.
type test struct {
	name    string
	unit    string
	bulk    bool                                                     // CPU per Gbit is reported
	latency bool                                                     // p50 and p99 are reported
	measure func(s services, d time.Duration) (cell, float64, error) // the cell, and Gbit carried (bulk)
}

var tests = []test{
	{name: "bulk up, 1 stream", unit: "Gbit/s", bulk: true, measure: bulk(true, 1)},
	{name: "bulk up, 8 streams", unit: "Gbit/s", bulk: true, measure: bulk(true, 8)},
	{name: "bulk down, 8 streams", unit: "Gbit/s", bulk: true, measure: bulk(false, 8)},
	{name: "request/response, 32 conns", unit: "req/s", latency: true, measure: func(s services, d time.Duration) (cell, float64, error) {
		r, err := requestResponse(s.echo, 32, d)
		return cell{value: r.rate, p50: r.p50, p99: r.p99}, 0, err
	}},
	{name: "connect+request+close, 16", unit: "conn/s", measure: func(s services, d time.Duration) (cell, float64, error) {
		r, err := connectRate(s.rpc, 16, d)
		return cell{value: r}, 0, err
	}},
}

// bulk measures n streams up (to the sink) or down (from the source).
func bulk(up bool, n int) func(services, time.Duration) (cell, float64, error) {
	return func(s services, d time.Duration) (cell, float64, error) {
		f, addr := bulkDown, s.down
		if up {
			f, addr = bulkUp, s.up
		}
		r, err := f(addr, n, d)
		return cell{value: r.Gbps()}, r.gbits(), err
	}
}

func run(cfg config, chk *benchutil.Checks) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	tmp, err := os.MkdirTemp("", "tether-bench-paths")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	t := &tetherSetup{dir: tmp, pki: filepath.Join(tmp, "pki"), dataPlane: ps.DataPlaneListeners}
	// The sk_lookup plane attaches to its whole namespace: only in this
	// run's own.
	if testutil.InPrivateNetns() {
		t.dataPlane = ps.DataPlaneSKLookup
	}
	if t.bin, err = testutil.BuildTether(tmp); err != nil {
		return err
	}
	t.pool = hasPoolFlags(t.bin)
	var stopRedis func()
	if t.redisURL, stopRedis, err = benchutil.StartRedis(); err != nil {
		return err
	}
	defer stopRedis()
	var creds ps.Config
	if err := benchutil.PSCredentials(&creds); err != nil {
		return err
	}
	t.psTokens = creds.TokenFile
	t.agentToken = filepath.Join(tmp, "agent-token")
	if err := os.WriteFile(t.agentToken, []byte(benchutil.Token+"\n"), 0o600); err != nil {
		return err
	}
	if err := makePKI(t.bin, t.pki); err != nil {
		return err
	}
	direct, err := startServers()
	if err != nil {
		return err
	}

	cols := []*column{
		{name: "direct", kind: "direct", addrs: direct},
		{name: "tether mux plain", kind: "tether"},
		{name: "tether mux TLS", kind: "tether", tls: true},
		{name: "tether pool plain", kind: "tether", pool: true},
		{name: "tether pool TLS", kind: "tether", tls: true, pool: true},
	}
	if cfg.frpDir != "" {
		cols = append(cols, &column{name: "frp defaults (TLS)", kind: "frp", tls: true}, &column{name: "frp TLS off", kind: "frp"})
	}
	defer func() {
		for _, c := range cols {
			for _, p := range c.procs {
				p.Stop(5 * time.Second)
			}
		}
	}()
	for i, c := range cols {
		switch {
		case c.kind == "tether" && c.pool && !t.pool:
			c.na = "this tether has no --data-path/--pool-size"
		case c.kind == "tether":
			if err := t.startTether(ctx, c, i, direct, 21000+100*i); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
		case c.kind == "frp":
			if err := startFRP(ctx, tmp, cfg.frpDir, c, direct); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
		}
		if c.ps != nil {
			if c.before, err = benchutil.Scrape(c.ps.Metrics); err != nil {
				return fmt.Errorf("%s: metrics: %w", c.name, err)
			}
		}
	}

	fmt.Printf("tether data paths, like for like: loopback, %d CPUs, GOMAXPROCS=%d, %v per measurement, median of %d rounds; "+
		"ps and agent as processes (data plane %s, token credentials; TLS columns: tether certs), pool size %d\n\n",
		runtime.NumCPU(), runtime.GOMAXPROCS(0), cfg.dur, cfg.rounds, t.dataPlane, poolSize)
	results, err := measureAll(ctx, cfg, cols, chk)
	if err != nil {
		return err
	}
	printTable(cols, results)
	printRatios(cols, results)
	return checkPaths(cols, chk)
}

// measureAll measures every row on every measured column, cfg.rounds times
// in alternating column order, and returns the medians: results[row][col].
func measureAll(ctx context.Context, cfg config, cols []*column, chk *benchutil.Checks) ([][]*cell, error) {
	results := make([][]*cell, len(tests))
	for ti, tt := range tests {
		runs := make([][]cell, len(cols))
		for round := range cfg.rounds {
			order := make([]int, len(cols))
			for i := range order {
				order[i] = i
			}
			if round%2 == 1 {
				slices.Reverse(order)
			}
			for _, ci := range order {
				c := cols[ci]
				if c.na != "" {
					continue
				}
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				cpu0, err := c.cpuSeconds()
				if err != nil {
					return nil, err
				}
				got, gbits, err := tt.measure(c.addrs, cfg.dur)
				if err != nil {
					return nil, fmt.Errorf("%s, %s: %w%s", tt.name, c.name, err, c.logs())
				}
				cpu1, err := c.cpuSeconds()
				if err != nil {
					return nil, err
				}
				if tt.bulk && c.kind != "direct" {
					got.cpuPerGbit = (cpu1 - cpu0) / gbits
				}
				runs[ci] = append(runs[ci], got)
			}
		}
		results[ti] = make([]*cell, len(cols))
		for ci, c := range cols {
			if c.na != "" {
				continue
			}
			if !chk.Equal(tt.name+", "+c.name+": rounds measured", len(runs[ci]), cfg.rounds) {
				continue
			}
			m := medianCell(runs[ci])
			results[ti][ci] = &m
			chk.Positive(tt.name+", "+c.name, m.value)
			if tt.latency {
				chk.Positive(tt.name+", "+c.name+": p99", float64(m.p99))
			}
			// CPU ticks are 10 ms: a very short bulk run on a fast path may
			// read zero, so only finite and not negative is asserted.
			if tt.bulk && c.kind != "direct" {
				chk.True(m.cpuPerGbit >= 0, "%s, %s: CPU per Gbit %v, want >= 0", tt.name, c.name, m.cpuPerGbit)
			}
		}
	}
	return results, nil
}

// medianCell is the median of each figure of cs, independently.
func medianCell(cs []cell) cell {
	pick := func(f func(cell) float64) float64 {
		xs := make([]float64, len(cs))
		for i, c := range cs {
			xs[i] = f(c)
		}
		slices.Sort(xs)
		return xs[len(xs)/2]
	}
	return cell{
		value:      pick(func(c cell) float64 { return c.value }),
		p50:        time.Duration(pick(func(c cell) float64 { return float64(c.p50) })),
		p99:        time.Duration(pick(func(c cell) float64 { return float64(c.p99) })),
		cpuPerGbit: pick(func(c cell) float64 { return c.cpuPerGbit }),
	}
}

// ---- the table ------------------------------------------------------------------

// printTable prints the results as a markdown table: direct in its unit,
// every other column as its ratio to direct; a CPU row under each bulk
// row.
func printTable(cols []*column, results [][]*cell) {
	var head, rule []string
	head, rule = append(head, "test"), append(rule, "---")
	for _, c := range cols {
		head, rule = append(head, c.name), append(rule, "---")
	}
	fmt.Println("| " + strings.Join(head, " | ") + " |")
	fmt.Println("| " + strings.Join(rule, " | ") + " |")
	for ti, tt := range tests {
		line := []string{tt.name}
		direct := results[ti][0]
		for ci := range cols {
			r := results[ti][ci]
			switch {
			case r == nil:
				line = append(line, "n/a")
			case ci == 0:
				s := value(r.value, tt.unit)
				if tt.latency {
					s += fmt.Sprintf(" (p50 %s, p99 %s)", ms(r.p50), ms(r.p99))
				}
				line = append(line, s)
			default:
				s := fmt.Sprintf("%.2f× (%s)", r.value/direct.value, value(r.value, tt.unit))
				if tt.latency {
					s += fmt.Sprintf(" p50 %s, p99 %s", ms(r.p50), ms(r.p99))
				}
				line = append(line, s)
			}
		}
		fmt.Println("| " + strings.Join(line, " | ") + " |")
		if !tt.bulk {
			continue
		}
		cpu := []string{"↳ CPU-s per Gbit (proxy)"}
		for ci := range cols {
			r := results[ti][ci]
			switch {
			case ci == 0:
				cpu = append(cpu, "—")
			case r == nil:
				cpu = append(cpu, "n/a")
			default:
				cpu = append(cpu, fmt.Sprintf("%.3f", r.cpuPerGbit))
			}
		}
		fmt.Println("| " + strings.Join(cpu, " | ") + " |")
	}
}

// printRatios prints pool/mux (plain and TLS) and, with frp, tether/frp
// like for like (TLS against frp's defaults, plain against frp TLS off):
// throughput and rates as a speed ratio, p99 as frp's over tether's (above
// 1 = tether's tail is shorter).
func printRatios(cols []*column, results [][]*cell) {
	idx := map[string]int{}
	for i, c := range cols {
		idx[c.name] = i
	}
	type pair struct{ a, b string }
	pairs := []pair{
		{"tether pool plain", "tether mux plain"},
		{"tether pool TLS", "tether mux TLS"},
		{"tether mux TLS", "frp defaults (TLS)"},
		{"tether pool TLS", "frp defaults (TLS)"},
		{"tether mux plain", "frp TLS off"},
		{"tether pool plain", "frp TLS off"},
	}
	fmt.Println()
	for _, p := range pairs {
		ai, aok := idx[p.a]
		bi, bok := idx[p.b]
		if !aok || !bok {
			continue
		}
		var parts []string
		for ti, tt := range tests {
			a, b := results[ti][ai], results[ti][bi]
			if a == nil || b == nil {
				parts = append(parts, tt.name+" n/a")
				continue
			}
			s := fmt.Sprintf("%s %.2f×", tt.name, a.value/b.value)
			if tt.latency {
				s += fmt.Sprintf(" (p99 %.2f×)", float64(b.p99)/float64(a.p99))
			}
			if tt.bulk && b.cpuPerGbit > 0 && a.cpuPerGbit > 0 {
				s += fmt.Sprintf(" (CPU/Gbit %.2f×)", a.cpuPerGbit/b.cpuPerGbit)
			}
			parts = append(parts, s)
		}
		fmt.Printf("%s / %s: %s\n", p.a, p.b, strings.Join(parts, "; "))
	}
}

func value(v float64, unit string) string {
	switch {
	case unit == "Gbit/s":
		return fmt.Sprintf("%.2f Gbit/s", v)
	case v >= 10000:
		return fmt.Sprintf("%.1fk%s", v/1000, strings.TrimPrefix(unit, "req"))
	default:
		return fmt.Sprintf("%.0f %s", v, unit)
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

// checkPaths checks each tether column carried its connections on the
// path it names, when the PS counts paths (tether_ps_data_path_total):
// the pool columns mostly pooled, the mux columns never. It prints the
// pool columns' pooled share.
func checkPaths(cols []*column, chk *benchutil.Checks) error {
	var errs []error
	for _, c := range cols {
		if c.ps == nil {
			continue
		}
		after, err := benchutil.Scrape(c.ps.Metrics)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: metrics: %w", c.name, err))
			continue
		}
		const poolKey, muxKey = `tether_ps_data_path_total{path="pool"}`, `tether_ps_data_path_total{path="mux"}`
		_, hasPool := after[poolKey]
		_, hasMux := after[muxKey]
		if !hasPool && !hasMux {
			if c.pool {
				chk.Failf("%s: the PS exports no tether_ps_data_path_total: which path carried the connections is unknown", c.name)
			}
			continue
		}
		pooled, muxed := after[poolKey]-c.before[poolKey], after[muxKey]-c.before[muxKey]
		if pooled+muxed == 0 {
			chk.Failf("%s: the PS counted no connection on either path (tether_ps_data_path_total), though the run made thousands", c.name)
			continue
		}
		if c.pool {
			chk.True(pooled > 0, "%s: no connection took the pool (mux %v)", c.name, muxed)
			fmt.Printf("%s: %.1f%% of %v connections pooled\n", c.name, 100*pooled/max(pooled+muxed, 1), pooled+muxed)
		} else {
			chk.True(pooled == 0 && muxed > 0, "%s: connections pooled %v, mux %v; want all on mux", c.name, pooled, muxed)
		}
	}
	return errors.Join(errs...)
}

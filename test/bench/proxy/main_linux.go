// Command proxy compares the two ways a client reaches an agent, on
// loopback in one run: connect+request+close rate directly to the service,
// through the SOCKS5 proxy, and through the eBPF redirect (the client in a
// cgroup with the redirector's programs), each as a ratio to direct. Both
// tether paths go through the same two PS nodes and agent. Needs root.
//
// Every run also checks what holds on any machine, however loaded (each
// rate positive and finite, every answer the agent's service's, the eBPF
// redirect counted the connects it redirected) and exits 1 when a check
// fails. -smoke makes the same run in seconds.
//
//	go run ./test/bench/proxy [-smoke] [-d 3s]
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/tether-net/tether/agent"

	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/proxy"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/test/bench/benchutil"
)

const target = "127.77.0.1:9100"

// body is what the agent's service answers; every client checks for it.
const body = "agent-a1\n"

var quiet = slog.New(slog.DiscardHandler)

func main() {
	if mode := os.Getenv("BENCH_CLIENT"); mode != "" {
		os.Exit(client(mode))
	}
	dur := flag.Duration("d", 3*time.Second, "duration of each measurement")
	smoke := flag.Bool("smoke", false, "the same run in seconds (short measurements, every check), for CI")
	flag.Parse()
	chk := benchutil.NewChecks("bench/proxy")
	if *smoke {
		if err := benchutil.SmokeDefaults(flag.CommandLine, map[string]string{"d": "250ms"}); err != nil {
			chk.Finish(err)
		}
	}
	if os.Geteuid() != 0 {
		chk.Finish(errors.New("needs root (eBPF, cgroups)"))
	}
	chk.Finish(run(*dur, chk))
}

func run(dur time.Duration, chk *benchutil.Checks) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	redisURL, stopRedis, err := benchutil.StartRedis()
	if err != nil {
		return err
	}
	defer stopRedis()
	svc, err := startService()
	if err != nil {
		return err
	}
	socks, err := startTether(ctx, redisURL, svc)
	if err != nil {
		return err
	}
	cg, cleanup, err := startRedirector(ctx, redisURL)
	defer cleanup()
	if err != nil {
		return err
	}
	if err := waitReady(cg, socks); err != nil {
		return err
	}
	return compare(dur, cg, svc, socks, chk)
}

// startService starts the HTTP service the agent exposes.
func startService() (string, error) {
	svc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	go func() {
		_ = http.Serve(svc, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, body) }))
	}()
	return svc.Addr().String(), nil
}

// startTether starts two PS nodes, the agent exposing svc as target, and
// the SOCKS5 proxy; it returns the proxy's address.
func startTether(ctx context.Context, redisURL, svc string) (string, error) {
	var servers []string
	for i, ports := range []string{"41000-41099", "41100-41199"} {
		cfg := ps.DefaultConfig()
		cfg.ID, cfg.Listen, cfg.Advertise, cfg.Redis, cfg.Ports, cfg.Logger = fmt.Sprintf("ps%d", i+1), "127.0.0.1:0", []string{"127.0.0.1"}, redisURL, ports, quiet
		cfg.DataPlane = ps.DataPlaneListeners
		if err := benchutil.PSCredentials(&cfg); err != nil {
			return "", err
		}
		ps, err := ps.New(cfg)
		if err != nil {
			return "", err
		}
		go func() { _ = ps.Run(ctx) }()
		a, err := ps.Addr(ctx)
		if err != nil {
			return "", err
		}
		servers = append(servers, a.String())
	}
	acfg := agent.DefaultConfig()
	acfg.ID, acfg.IP, acfg.Servers, acfg.Expose, acfg.Logger = "a1", "127.77.0.1", servers, []string{"9100=" + svc}, quiet
	acfg.Token = benchutil.Token
	ag, err := agent.New(acfg)
	if err != nil {
		return "", err
	}
	go func() { _ = ag.Run(ctx) }()

	pcfg := proxy.DefaultConfig()
	pcfg.Redis, pcfg.Socks, pcfg.Logger = redisURL, "127.0.0.1:0", quiet
	px, err := proxy.New(pcfg)
	if err != nil {
		return "", err
	}
	go func() { _ = px.Run(ctx) }()
	socks, err := px.Addr(ctx, "socks")
	if err != nil {
		return "", err
	}
	return socks.String(), nil
}

// cgroups are the client cgroups, with and without the redirector, and the
// redirector's pin directory.
type cgroups struct{ plain, hooked, pin string }

// startRedirector makes the two client cgroups (under the cgroup2 mount,
// never its root) and runs the redirector on the hooked one. The cleanup
// it returns, even with an error, undoes what was done.
func startRedirector(ctx context.Context, redisURL string) (cgroups, func(), error) {
	var undo []func()
	cleanup := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	mnt, err := cgroup2.Mount()
	if err != nil {
		return cgroups{}, cleanup, err
	}
	suffix := strconv.Itoa(os.Getpid())
	cg := cgroups{filepath.Join(mnt, "tether-bench-p-"+suffix), filepath.Join(mnt, "tether-bench-h-"+suffix), "/sys/fs/bpf/tether-bench-" + suffix}
	for _, d := range []string{cg.plain, cg.hooked} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return cg, cleanup, err
		}
		undo = append(undo, func() { _ = os.Remove(d) })
	}
	rcfg := redirector.DefaultConfig()
	rcfg.Redis, rcfg.Cgroup, rcfg.PinDir, rcfg.MapSize, rcfg.Logger = redisURL, cg.hooked, cg.pin, 1000, quiet
	rcfg.TargetCIDRs = []string{"127.77.0.0/16"}
	undo = append(undo, func() { _ = redirector.Uninstall(rcfg.PinDir) })
	rd, err := redirector.New(rcfg)
	if err != nil {
		return cg, cleanup, err
	}
	undo = append(undo, func() { _ = rd.Close() })
	go func() { _ = rd.Run(ctx) }()
	return cg, cleanup, nil
}

// waitReady waits until both tether paths answer.
func waitReady(cg cgroups, socks string) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, e1 := measure(cg.hooked, "ebpf", target, "", 200*time.Millisecond)
		_, e2 := measure(cg.plain, "socks", target, socks, 200*time.Millisecond)
		if e1 == nil && e2 == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("tether paths not ready: ebpf %v, socks %v", e1, e2)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// result is one client run: requests per second and requests answered.
type result struct {
	rate float64
	n    int64
}

// compare measures the three paths, checks each, and prints the table.
func compare(dur time.Duration, cg cgroups, svc, socks string, chk *benchutil.Checks) error {
	direct, err := measure(cg.plain, "direct", svc, "", dur)
	if err != nil {
		return err
	}
	viaSocks, err := measure(cg.plain, "socks", target, socks, dur)
	if err != nil {
		return err
	}
	before, err := redirected(cg.pin)
	if err != nil {
		return err
	}
	viaEBPF, err := measure(cg.hooked, "ebpf", target, "", dur)
	if err != nil {
		return err
	}
	after, err := redirected(cg.pin)
	if err != nil {
		return err
	}
	st, err := redirector.ReadStatus(cg.pin)
	if err != nil {
		return err
	}
	// The same path with the intent option off: the sockops program is
	// detached from the cgroup (the PS still checks, and finds none).
	if err := detachIntent(cg.pin); err != nil {
		return err
	}
	noIntent, err := measure(cg.hooked, "ebpf", target, "", dur)
	if err != nil {
		return err
	}
	chk.Positive("direct requests/s", direct.rate)
	chk.Positive("SOCKS5 requests/s", viaSocks.rate)
	chk.Positive("eBPF redirect requests/s", viaEBPF.rate)
	chk.Positive("eBPF redirect without intent requests/s", noIntent.rate)
	chk.True(after-before >= uint64(viaEBPF.n), "redirector's redirected counter grew by %d over %d eBPF requests (were they redirected?)", after-before, viaEBPF.n)
	chk.True(st.Counters["intent_written"] >= uint64(viaEBPF.n), "intent_written is %d after %d redirected requests (did their SYNs carry the intent?)", st.Counters["intent_written"], viaEBPF.n)
	fmt.Println("\n== connect+request+close, 4 clients (SOCKS5 proxy vs eBPF redirect) ==")
	fmt.Printf("%-40s %12s %8s\n", "path", "per second", "ratio")
	fmt.Printf("%-40s %12.0f %8s\n", "direct", direct.rate, "1.00×")
	fmt.Printf("%-40s %12.0f %7.2f×\n", "SOCKS5 proxy -> PS -> agent", viaSocks.rate, viaSocks.rate/direct.rate)
	fmt.Printf("%-40s %12.0f %7.2f×\n", "eBPF redirect -> PS -> agent", viaEBPF.rate, viaEBPF.rate/direct.rate)
	fmt.Printf("%-40s %12.0f %7.2f×\n", "eBPF redirect, no intent option", noIntent.rate, noIntent.rate/direct.rate)
	fmt.Printf("eBPF redirect vs SOCKS5: %.2f×\n", viaEBPF.rate/viaSocks.rate)
	fmt.Printf("intent option on vs off: %.3f× (aim: at most 3%% slower)\n", viaEBPF.rate/noIntent.rate)
	return nil
}

// detachIntent detaches the intent sockops program from the bench cgroup,
// through its pinned link.
func detachIntent(pin string) error {
	l, err := link.LoadPinnedLink(filepath.Join(pin, "link_intent"), nil)
	if err != nil {
		return fmt.Errorf("open the intent link: %w", err)
	}
	defer l.Close()
	if err := l.Detach(); err != nil {
		return fmt.Errorf("detach the intent program: %w", err)
	}
	return nil
}

// redirected reads the redirector's count of redirected connects.
func redirected(pin string) (uint64, error) {
	st, err := redirector.ReadStatus(pin)
	if err != nil {
		return 0, err
	}
	v, ok := st.Counters["redirected"]
	if !ok {
		return 0, errors.New("redirector has no counter \"redirected\"")
	}
	return v, nil
}

// measure runs the client in cgroup for d.
func measure(cgroup, mode, addr, socks string, d time.Duration) (result, error) {
	f, err := os.Open(cgroup)
	if err != nil {
		return result{}, err
	}
	defer f.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), "BENCH_CLIENT="+mode, "BENCH_ADDR="+addr, "BENCH_SOCKS="+socks, "BENCH_DURATION="+d.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return result{}, fmt.Errorf("%s client: %v: %s", mode, err, strings.TrimSpace(string(out)))
	}
	var r result
	if _, err := fmt.Sscanf(string(out), "%g %d", &r.rate, &r.n); err != nil {
		return result{}, fmt.Errorf("%s client: output %q: %v", mode, out, err)
	}
	return r, nil
}

// client does connect+GET+close in 4 workers for BENCH_DURATION and prints
// requests/second and requests answered. A request that fails counts
// against a 1% allowance; an answer that is not the agent's service's
// fails the run.
func client(mode string) int {
	addr, socks := os.Getenv("BENCH_ADDR"), os.Getenv("BENCH_SOCKS")
	d, _ := time.ParseDuration(os.Getenv("BENCH_DURATION"))
	var n, failed, wrong atomic.Int64
	var firstWrong atomic.Value
	end := time.Now().Add(d)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				resp, err := get(mode, addr, socks)
				switch {
				case err != nil:
					failed.Add(1)
				case !strings.HasPrefix(resp, "HTTP/1.") || !strings.HasSuffix(resp, "\r\n\r\n"+body):
					wrong.Add(1)
					firstWrong.CompareAndSwap(nil, resp)
				default:
					n.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if wrong.Load() > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d answers are not the service's, first: %q\n", wrong.Load(), failed.Load()+wrong.Load()+n.Load(), firstWrong.Load())
		return 1
	}
	if failed.Load() > n.Load()/100 {
		fmt.Fprintf(os.Stderr, "%d of %d requests failed\n", failed.Load(), failed.Load()+n.Load())
		return 1
	}
	fmt.Printf("%f %d\n", float64(n.Load())/d.Seconds(), n.Load())
	return 0
}

// get does one connect+GET+close and returns the whole answer.
func get(mode, addr, socks string) (string, error) {
	var c net.Conn
	var err error
	if mode == "socks" {
		c, err = socksDial(socks, addr)
	} else {
		c, err = net.Dial("tcp", addr)
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return "", err
	}
	var buf [4096]byte
	resp, err := readAll(c, buf[:0])
	return string(resp), err
}

// readAll reads c to EOF into buf.
func readAll(c net.Conn, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			return buf, errors.New("answer longer than 4 KiB")
		}
		k, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+k]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// socksDial is a minimal SOCKS5 CONNECT client (no auth, IPv4 target).
func socksDial(socks, addr string) (net.Conn, error) {
	c, err := net.Dial("tcp", socks)
	if err != nil {
		return nil, err
	}
	ap := netip.MustParseAddrPort(addr)
	a4 := ap.Addr().As4()
	req := []byte{5, 1, 0, 5, 1, 0, 1, a4[0], a4[1], a4[2], a4[3], 0, 0}
	binary.BigEndian.PutUint16(req[len(req)-2:], ap.Port())
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	resp := make([]byte, 12)
	if _, err := io.ReadFull(c, resp); err != nil || resp[1] != 0 || resp[3] != 0 {
		c.Close()
		return nil, fmt.Errorf("socks5 connect: %v %x", err, resp)
	}
	return c, nil
}

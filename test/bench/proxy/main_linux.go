// Command proxy compares the two ways a client reaches an agent, on
// loopback in one run: connect+request+close rate directly to the service,
// through the SOCKS5 proxy, and through the eBPF redirect (the client in a
// cgroup with the redirector's programs), each as a ratio to direct. Both
// tether paths go through the same two PS nodes and agent. Needs root.
package main

import (
	"context"
	"encoding/binary"
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

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/proxy"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/test/bench/benchutil"
)

const target = "127.77.0.1:9100"

func main() {
	if mode := os.Getenv("BENCH_CLIENT"); mode != "" {
		os.Exit(client(mode))
	}
	dur := flag.Duration("d", 3*time.Second, "duration of each measurement")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench/proxy: needs root (eBPF, cgroups)")
		os.Exit(1)
	}
	if err := run(*dur); err != nil {
		fmt.Fprintln(os.Stderr, "bench/proxy:", err)
		os.Exit(1)
	}
}

func run(dur time.Duration) error {
	quiet := slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	redisURL, stopRedis, err := benchutil.StartRedis()
	if err != nil {
		return err
	}
	defer stopRedis()

	// The service the agent exposes.
	svc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		_ = http.Serve(svc, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "agent-a1\n") }))
	}()

	var servers []string
	for i, ports := range []string{"41000-41099", "41100-41199"} {
		cfg := ps.DefaultConfig()
		cfg.ID, cfg.Listen, cfg.Advertise, cfg.Redis, cfg.Ports, cfg.Logger = fmt.Sprintf("ps%d", i+1), "127.0.0.1:0", "127.0.0.1", redisURL, ports, quiet
		ps, err := ps.New(cfg)
		if err != nil {
			return err
		}
		go func() { _ = ps.Run(ctx) }()
		a, err := ps.Addr(ctx)
		if err != nil {
			return err
		}
		servers = append(servers, a.String())
	}
	acfg := agent.DefaultConfig()
	acfg.ID, acfg.IP, acfg.Servers, acfg.Expose, acfg.Logger = "a1", "127.77.0.1", servers, []string{"9100=" + svc.Addr().String()}, quiet
	ag, err := agent.New(acfg)
	if err != nil {
		return err
	}
	go func() { _ = ag.Run(ctx) }()

	pcfg := proxy.DefaultConfig()
	pcfg.Redis, pcfg.Socks, pcfg.Logger = redisURL, "127.0.0.1:0", quiet
	px, err := proxy.New(pcfg)
	if err != nil {
		return err
	}
	go func() { _ = px.Run(ctx) }()
	socks, err := px.Addr(ctx, "socks")
	if err != nil {
		return err
	}

	mnt, err := cgroup2.Mount()
	if err != nil {
		return err
	}
	suffix := strconv.Itoa(os.Getpid())
	plain, hooked := filepath.Join(mnt, "tether-bench-p-"+suffix), filepath.Join(mnt, "tether-bench-h-"+suffix)
	for _, d := range []string{plain, hooked} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		defer os.Remove(d)
	}
	rcfg := redirector.DefaultConfig()
	rcfg.Redis, rcfg.Cgroup, rcfg.PinDir, rcfg.MapSize, rcfg.Logger = redisURL, hooked, "/sys/fs/bpf/tether-bench-"+suffix, 1000, quiet
	rd, err := redirector.New(rcfg)
	if err != nil {
		return err
	}
	defer redirector.Uninstall(rcfg.PinDir)
	defer rd.Close()
	go func() { _ = rd.Run(ctx) }()

	// Wait until both tether paths answer.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, e1 := measure(hooked, "ebpf", target, "", 200*time.Millisecond)
		_, e2 := measure(plain, "socks", target, socks.String(), 200*time.Millisecond)
		if e1 == nil && e2 == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("tether paths not ready: ebpf %v, socks %v", e1, e2)
		}
		time.Sleep(200 * time.Millisecond)
	}

	direct, err := measure(plain, "direct", svc.Addr().String(), "", dur)
	if err != nil {
		return err
	}
	viaSocks, err := measure(plain, "socks", target, socks.String(), dur)
	if err != nil {
		return err
	}
	viaEBPF, err := measure(hooked, "ebpf", target, "", dur)
	if err != nil {
		return err
	}
	fmt.Println("\n== connect+request+close, 4 clients (SOCKS5 proxy vs eBPF redirect) ==")
	fmt.Printf("%-34s %12s %8s\n", "path", "per second", "ratio")
	fmt.Printf("%-34s %12.0f %8s\n", "direct", direct, "1.00×")
	fmt.Printf("%-34s %12.0f %7.2f×\n", "SOCKS5 proxy -> PS -> agent", viaSocks, viaSocks/direct)
	fmt.Printf("%-34s %12.0f %7.2f×\n", "eBPF redirect -> PS -> agent", viaEBPF, viaEBPF/direct)
	fmt.Printf("eBPF redirect vs SOCKS5: %.2f×\n", viaEBPF/viaSocks)
	return nil
}

// measure runs the client in cgroup and returns requests per second.
func measure(cgroup, mode, addr, socks string, d time.Duration) (float64, error) {
	f, err := os.Open(cgroup)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), "BENCH_CLIENT="+mode, "BENCH_ADDR="+addr, "BENCH_SOCKS="+socks, "BENCH_DURATION="+d.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%s client: %v: %s", mode, err, out)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

// client does connect+GET+close in 4 workers and prints requests/second.
func client(mode string) int {
	addr, socks := os.Getenv("BENCH_ADDR"), os.Getenv("BENCH_SOCKS")
	d, _ := time.ParseDuration(os.Getenv("BENCH_DURATION"))
	var n, failed atomic.Int64
	end := time.Now().Add(d)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for time.Now().Before(end) {
				var c net.Conn
				var err error
				if mode == "socks" {
					c, err = socksDial(socks, addr)
				} else {
					c, err = net.Dial("tcp", addr)
				}
				if err == nil {
					_, err = io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
					for err == nil {
						_, err = c.Read(buf)
					}
					if err == io.EOF {
						err = nil
					}
					c.Close()
				}
				if err != nil {
					failed.Add(1)
					continue
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if failed.Load() > n.Load()/100 {
		fmt.Fprintf(os.Stderr, "%d of %d requests failed\n", failed.Load(), failed.Load()+n.Load())
		return 1
	}
	fmt.Printf("%f\n", float64(n.Load())/d.Seconds())
	return 0
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

// Command demo raises the simulated company network of docs/DESIGN.md, starts
// every tether component on it, and tells the story on the terminal: the
// route table, the kernel map, an unmodified curl reaching agents by their
// own IPs from the client cgroup (and failing outside it), and a PS killed
// with kill -9 while traffic recovers. It tears everything down on exit or
// Ctrl-C, and runs again cleanly. `make demo` runs it as root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/test/netsim"
)

func main() {
	netsim.MaybeServeIdentity()
	tether := flag.String("tether", "bin/tether", "the tether binary")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, *tether)
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, a ...any) {
	fmt.Printf("\n\033[1m== %s\033[0m\n", fmt.Sprintf(format, a...))
}

func show(cmdline string, out string) {
	fmt.Printf("$ %s\n%s", cmdline, out)
	if out != "" && !strings.HasSuffix(out, "\n") {
		fmt.Println()
	}
}

func run(ctx context.Context, tether string) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root (network namespaces, eBPF, cgroups): run `sudo make demo`")
	}
	tether, err = filepath.Abs(tether)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}

	step("Raising the simulated company network (network namespaces, 198.18.0.0/15, no route out)")
	start := time.Now()
	n, err := netsim.Build(netsim.NewPrefix())
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "tether-demo")
	if err != nil {
		return err
	}
	mnt, err := cgroup2.Mount()
	if err != nil {
		return err
	}
	cg := filepath.Join(mnt, "tether-demo-"+n.Prefix)
	if err := os.Mkdir(cg, 0o755); err != nil {
		return err
	}
	sys, err := netsim.NewSystem(n, tether, dir, cg, "/sys/fs/bpf/tether-demo-"+n.Prefix)
	if err != nil {
		return err
	}
	defer func() {
		step("Tearing down: processes, redirector pins, cgroup, namespaces")
		if uerr := sys.Uninstall(); uerr != nil {
			fmt.Println(uerr)
		}
		cerr := n.Close()
		_ = os.WriteFile(filepath.Join(cg, "cgroup.kill"), []byte("1"), 0o644)
		for i := 0; i < 50 && os.Remove(cg) != nil; i++ {
			time.Sleep(20 * time.Millisecond)
		}
		os.RemoveAll(dir)
		if err == nil {
			err = cerr
		}
		fmt.Println("done.")
	}()
	fmt.Printf("namespaces %s-{core,ps1,ps2,a1,a2,b1,central} up in %v\n", n.Prefix, time.Since(start).Round(time.Millisecond))
	fmt.Println(`  vpc-a: a1 198.18.1.11, a2 198.18.1.12      vpc-b: b1 198.18.2.11
  core router: VIP 198.18.0.10 (and .11) -> nftables DNAT numgen -> ps1 198.18.0.21 | ps2 198.18.0.22
  central: Redis, the redirector, the client          VPC hosts reach only the VIP's tunnel port`)
	out, _ := n.Run("a1", "curl", "-sS", "--max-time", "2", "http://198.18.3.10:6379/")
	show("(on a1) curl http://198.18.3.10:6379/   # vpc-a cannot reach central", string(out))

	step("Starting Redis, two PS nodes, three agents (given only the VIP) and the redirector")
	start = time.Now()
	if err := sys.StartAll(ctx, self); err != nil {
		return err
	}
	fmt.Printf("every agent has tunnels on two distinct PS nodes, and the route map is loaded, after %v\n", time.Since(start).Round(time.Millisecond))

	step("The route table in Redis")
	out, _ = n.Run("central", tether, "routes", "list", "--redis", netsim.RedisURL)
	show("tether routes list --redis "+netsim.RedisURL, string(out))

	step("The same routes in the kernel, as the eBPF program reads them")
	if bpftool, lerr := exec.LookPath("bpftool"); lerr == nil {
		out, _ := exec.Command(bpftool, "map", "dump", "pinned", sys.PinDir+"/tether_routes").CombinedOutput()
		show("bpftool map dump pinned "+sys.PinDir+"/tether_routes | head -40", firstLines(string(out), 40))
	}
	out, _ = exec.Command(tether, "redirector", "status", "--pin-dir", sys.PinDir).CombinedOutput()
	show("tether redirector status --pin-dir "+sys.PinDir, string(out))

	step("An unmodified curl on central, inside the redirector's cgroup, dials the agents by their own IPs")
	for _, host := range []string{"a1", "b1"} {
		t0 := time.Now()
		body, cerr := sys.Curl(true, "http://"+sys.Target(host)+"/")
		show(fmt.Sprintf("curl http://%s/", sys.Target(host)), fmt.Sprintf("%s   (%v, err=%v)\n", body, time.Since(t0).Round(time.Millisecond), cerr))
	}

	step("The same curl outside the cgroup: central has no route to the VPCs")
	t0 := time.Now()
	body, cerr := sys.Curl(false, "http://"+sys.Target("a1")+"/")
	show(fmt.Sprintf("curl http://%s/", sys.Target("a1")), fmt.Sprintf("%s   (%v, err=%v)\n", body, time.Since(t0).Round(time.Millisecond), cerr))

	step("kill -9 of ps1 while the client keeps requesting a1")
	type sample struct {
		at time.Time
		ok bool
	}
	results := make(chan sample, 10000)
	lctx, lcancel := context.WithCancel(ctx)
	go func() {
		defer close(results)
		for lctx.Err() == nil {
			b, e := sys.Curl(true, "http://"+sys.Target("a1")+"/")
			results <- sample{time.Now(), e == nil && b == "a1"}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second)
	sys.Procs["ps1"].Stop()
	killed := time.Now()
	fmt.Printf("ps1 killed at %s\n", killed.Format("15:04:05.000"))
	time.Sleep(6 * time.Second)
	lcancel()
	var ok, failed int
	var lastFail time.Time
	for s := range results {
		if s.ok {
			ok++
		} else {
			failed++
			lastFail = s.at
		}
	}
	if failed > 0 {
		fmt.Printf("client: %d requests answered by a1, %d failed; the last failure %v after the kill (the lease is 3s)\n", ok, failed, lastFail.Sub(killed).Round(time.Millisecond))
	} else {
		fmt.Printf("client: %d requests answered by a1, none failed\n", ok)
	}
	out, _ = n.Run("central", tether, "routes", "get", sys.Target("a1"), "--redis", netsim.RedisURL)
	show("tether routes get "+sys.Target("a1"), string(out))

	step("ps1 comes back; the agents return to two tunnels each")
	t0 = time.Now()
	if _, err := sys.StartPS("ps1"); err != nil {
		return err
	}
	for host := range netsim.Agents {
		if _, err := sys.WaitBackends(ctx, sys.Target(host), 2, 30*time.Second); err != nil {
			return err
		}
	}
	fmt.Printf("every route has two backends again %v after ps1 restarted\n", time.Since(t0).Round(time.Millisecond))
	out, _ = n.Run("central", tether, "routes", "list", "--redis", netsim.RedisURL)
	show("tether routes list", string(out))
	return ctx.Err()
}

func firstLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) > n {
		return strings.Join(lines[:n], "") + "...\n"
	}
	return s
}

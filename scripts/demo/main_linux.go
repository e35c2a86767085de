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
	d, err := raise(tether)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := d.tearDown(); err == nil {
			err = cerr
		}
	}()
	step("Starting Redis, two PS nodes, three agents (given only the VIP) and the redirector")
	start := time.Now()
	if err := d.sys.StartAll(ctx, self); err != nil {
		return err
	}
	fmt.Printf("every agent has tunnels on two distinct PS nodes, and the route map is loaded, after %v\n", time.Since(start).Round(time.Millisecond))
	d.showRoutes()
	d.showReach()
	d.killPS(ctx)
	if err := d.restorePS(ctx); err != nil {
		return err
	}
	return ctx.Err()
}

// demo is the running story: the simulated network, tether on it, and
// what the teardown must remove.
type demo struct {
	tether string
	n      *netsim.Network
	sys    *netsim.System
	dir    string // scratch files
	cg     string // the client cgroup
}

// raise builds the simulated company network and the client cgroup.
func raise(tether string) (*demo, error) {
	step("Raising the simulated company network (network namespaces, 198.18.0.0/15, no route out)")
	start := time.Now()
	n, err := netsim.Build(netsim.NewPrefix())
	if err != nil {
		return nil, err
	}
	d := &demo{tether: tether, n: n}
	fail := func(err error) (*demo, error) { _ = d.tearDown(); return nil, err }
	if d.dir, err = os.MkdirTemp("", "tether-demo"); err != nil {
		return fail(err)
	}
	mnt, err := cgroup2.Mount()
	if err != nil {
		return fail(err)
	}
	cg := filepath.Join(mnt, "tether-demo-"+n.Prefix)
	if err := os.Mkdir(cg, 0o755); err != nil {
		return fail(err)
	}
	d.cg = cg
	if d.sys, err = netsim.NewSystem(n, tether, d.dir, cg, "/sys/fs/bpf/tether-demo-"+n.Prefix); err != nil {
		return fail(err)
	}
	fmt.Printf("namespaces %s-{core,ps1,ps2,a1,a2,b1,central} up in %v\n", n.Prefix, time.Since(start).Round(time.Millisecond))
	fmt.Println(`  vpc-a: a1 198.18.1.11, a2 198.18.1.12      vpc-b: b1 198.18.2.11
  core router: VIP 198.18.0.10 (and .11) -> nftables DNAT numgen -> ps1 198.18.0.21 | ps2 198.18.0.22
  central: Redis, the redirector, the client          VPC hosts reach only the VIP's tunnel port`)
	out, _ := n.Run("a1", "curl", "-sS", "--max-time", "2", "http://198.18.3.10:6379/")
	show("(on a1) curl http://198.18.3.10:6379/   # vpc-a cannot reach central", string(out))
	return d, nil
}

// tearDown stops every process, removes the redirector's pins, the cgroup,
// the namespaces and the scratch files.
func (d *demo) tearDown() error {
	step("Tearing down: processes, redirector pins, cgroup, namespaces")
	if d.sys != nil {
		if err := d.sys.Uninstall(); err != nil {
			fmt.Println(err)
		}
	}
	err := d.n.Close()
	if d.cg != "" {
		_ = os.WriteFile(filepath.Join(d.cg, "cgroup.kill"), []byte("1"), 0o644)
		for i := 0; i < 50 && os.Remove(d.cg) != nil; i++ {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if d.dir != "" {
		os.RemoveAll(d.dir)
	}
	fmt.Println("done.")
	return err
}

// showRoutes prints the routes in Redis and in the kernel map.
func (d *demo) showRoutes() {
	step("The route table in Redis")
	out, _ := d.n.Run("central", d.tether, "routes", "list", "--redis", netsim.RedisURL)
	show("tether routes list --redis "+netsim.RedisURL, string(out))

	step("The same routes in the kernel, as the eBPF program reads them")
	if bpftool, err := exec.LookPath("bpftool"); err == nil {
		out, _ := exec.Command(bpftool, "map", "dump", "pinned", d.sys.PinDir+"/tether_routes").CombinedOutput()
		show("bpftool map dump pinned "+d.sys.PinDir+"/tether_routes | head -40", firstLines(string(out), 40))
	}
	out, _ = exec.Command(d.tether, "redirector", "status", "--pin-dir", d.sys.PinDir).CombinedOutput()
	show("tether redirector status --pin-dir "+d.sys.PinDir, string(out))
}

// showReach curls the agents by their own IPs inside and outside the
// redirector's cgroup.
func (d *demo) showReach() {
	step("An unmodified curl on central, inside the redirector's cgroup, dials the agents by their own IPs")
	for _, host := range []string{"a1", "b1"} {
		t0 := time.Now()
		body, err := d.sys.Curl(true, "http://"+d.sys.Target(host)+"/")
		show(fmt.Sprintf("curl http://%s/", d.sys.Target(host)), fmt.Sprintf("%s   (%v, err=%v)\n", body, time.Since(t0).Round(time.Millisecond), err))
	}

	step("The same curl outside the cgroup: central has no route to the VPCs")
	t0 := time.Now()
	body, err := d.sys.Curl(false, "http://"+d.sys.Target("a1")+"/")
	show(fmt.Sprintf("curl http://%s/", d.sys.Target("a1")), fmt.Sprintf("%s   (%v, err=%v)\n", body, time.Since(t0).Round(time.Millisecond), err))
}

// killPS kills ps1 while a client keeps requesting a1, and says what the
// client saw.
func (d *demo) killPS(ctx context.Context) {
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
			b, e := d.sys.Curl(true, "http://"+d.sys.Target("a1")+"/")
			results <- sample{time.Now(), e == nil && b == "a1"}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second) // the story's pacing: traffic before the kill
	d.sys.Procs["ps1"].Stop()
	killed := time.Now()
	fmt.Printf("ps1 killed at %s\n", killed.Format("15:04:05.000"))
	time.Sleep(4 * time.Second) // and after it, past the lease (3 s)
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
		fmt.Printf("client: %d requests answered by a1, %d failed; the last failure %v after the kill\n", ok, failed, lastFail.Sub(killed).Round(time.Millisecond))
	} else {
		fmt.Printf("client: %d requests answered by a1, none failed\n", ok)
	}
	fmt.Println("(the agents reported their lost tunnels through ps2 at once, and the kernel stopped picking the backend that refused;\n the lease, 3 s, is only the fallback)")
	out, _ := d.n.Run("central", d.tether, "routes", "get", d.sys.Target("a1"), "--redis", netsim.RedisURL)
	show("tether routes get "+d.sys.Target("a1"), string(out))
}

// restorePS brings ps1 back and waits for every route to have two
// backends again.
func (d *demo) restorePS(ctx context.Context) error {
	step("ps1 comes back; the agents return to two tunnels each")
	t0 := time.Now()
	if _, err := d.sys.StartPS("ps1"); err != nil {
		return err
	}
	for host := range netsim.Agents {
		if _, err := d.sys.WaitBackends(ctx, d.sys.Target(host), 2, 30*time.Second); err != nil {
			return err
		}
	}
	fmt.Printf("every route has two backends again %v after ps1 restarted\n", time.Since(t0).Round(time.Millisecond))
	out, _ := d.n.Run("central", d.tether, "routes", "list", "--redis", netsim.RedisURL)
	show("tether routes list", string(out))
	return nil
}

func firstLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) > n {
		return strings.Join(lines[:n], "") + "...\n"
	}
	return s
}

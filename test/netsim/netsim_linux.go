// Package netsim owns the simulated company network of docs/DESIGN.md, built from
// network namespaces, veth pairs, Linux bridges and nftables, all inside
// 198.18.0.0/15 with no route out: two VPCs of agent hosts, a core router
// that load-balances the tunnel VIP over two PS nodes with nftables DNAT, and
// the central host. The end-to-end tests and `make demo` both raise it.
//
// Only the namespaces it creates are touched: nothing is added to the host's
// own network namespace, and every name carries a per-run prefix, so parallel
// or crashed runs never collide. A run records its namespaces under
// /run/tether-netsim; Build removes what dead runs left behind.
package netsim

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tether-net/tether/internal/execpath"
)

// Addresses of the simulated network.
var (
	VIP        = netip.MustParseAddr("198.18.0.10")
	VIP2       = netip.MustParseAddr("198.18.0.11")
	TunnelPort = uint16(7000)
	RedisPort  = uint16(6379)
)

// Host is one machine of the network: a namespace with one address.
type Host struct {
	Name string     // role name: core, ps1, ps2, a1, a2, b1, central
	NS   string     // namespace name (prefixed)
	IP   netip.Addr // its address (core: the PS-side gateway)
	VPC  string     // "vpc-a", "vpc-b", "ps", "central", or "" for core
}

type subnet struct {
	bridge string
	gw     netip.Prefix
}

var subnets = map[string]subnet{
	"ps":      {"br-ps", netip.MustParsePrefix("198.18.0.1/24")},
	"vpc-a":   {"br-a", netip.MustParsePrefix("198.18.1.1/24")},
	"vpc-b":   {"br-b", netip.MustParsePrefix("198.18.2.1/24")},
	"central": {"br-c", netip.MustParsePrefix("198.18.3.1/24")},
}

var layout = []struct {
	name, vpc, ip string
}{
	{"ps1", "ps", "198.18.0.21"},
	{"ps2", "ps", "198.18.0.22"},
	{"a1", "vpc-a", "198.18.1.11"},
	{"a2", "vpc-a", "198.18.1.12"},
	{"b1", "vpc-b", "198.18.2.11"},
	{"central", "central", "198.18.3.10"},
}

// Network is a raised topology. Close tears it down.
type Network struct {
	Prefix string
	Hosts  map[string]*Host

	mu    sync.Mutex
	procs []*Proc
}

const stateDir = "/run/tether-netsim"

// Build raises the topology with namespaces named prefix-<host>. prefix
// should be short and unique per run (see NewPrefix).
func Build(prefix string) (n *Network, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("netsim needs root (network namespaces, nftables)")
	}
	for _, bin := range []string{"nsenter", "nft"} {
		if _, err := execpath.Look(bin); err != nil {
			return nil, fmt.Errorf("netsim needs %s: %w (run scripts/setup.sh)", bin, err)
		}
	}
	CleanStale()
	n = &Network{Prefix: prefix, Hosts: map[string]*Host{}}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		return nil, err
	}
	names := []string{prefix + "-core"}
	for _, h := range layout {
		names = append(names, prefix+"-"+h.name)
	}
	state := fmt.Sprintf("%d\n%s\n", os.Getpid(), strings.Join(names, "\n"))
	if err := os.WriteFile(filepath.Join(stateDir, prefix), []byte(state), 0o644); err != nil {
		return nil, err
	}

	core := &Host{Name: "core", NS: prefix + "-core", IP: subnets["ps"].gw.Addr()}
	n.Hosts["core"] = core
	coreNS, err := newNamedNS(core.NS)
	if err != nil {
		return nil, err
	}
	defer coreNS.Close()
	coreH, err := netlink.NewHandleAt(coreNS)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", core.NS, err)
	}
	defer coreH.Close()
	if err := linkUp(coreH, "lo"); err != nil {
		return nil, err
	}
	bridges := map[string]*netlink.Bridge{}
	for vpc, sn := range subnets {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: sn.bridge}}
		if err := coreH.LinkAdd(br); err != nil {
			return nil, fmt.Errorf("add bridge %s: %w", sn.bridge, err)
		}
		if err := coreH.AddrAdd(br, &netlink.Addr{IPNet: prefixNet(sn.gw)}); err != nil {
			return nil, fmt.Errorf("address bridge %s: %w", sn.bridge, err)
		}
		if err := coreH.LinkSetUp(br); err != nil {
			return nil, err
		}
		bridges[vpc] = br
	}

	for _, l := range layout {
		h := &Host{Name: l.name, NS: prefix + "-" + l.name, IP: netip.MustParseAddr(l.ip), VPC: l.vpc}
		n.Hosts[l.name] = h
		if err := n.addHost(coreH, bridges[l.vpc], h); err != nil {
			return nil, err
		}
	}
	if out, err := n.Run("core", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"); err != nil {
		return nil, fmt.Errorf("enable forwarding in core: %w: %s", err, out)
	}
	cmd := n.Command("core", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(Ruleset())
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("load nftables ruleset in core: %w: %s", err, out)
	}
	return n, nil
}

// Ruleset is the core router's nftables ruleset: the VIP's DNAT over the
// two PS nodes, and a forward filter that lets VPC hosts reach only the
// tunnel port behind the VIP.
func Ruleset() string {
	return fmt.Sprintf(`table ip tether_netsim {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		# The VIP, load-balanced over the PS pool as kube-proxy's nftables mode does.
		ip daddr { %[1]s, %[2]s } tcp dport %[3]d dnat to numgen random mod 2 map { 0 : 198.18.0.21, 1 : 198.18.0.22 }
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		# Hosts of one subnet talk to each other (bridged traffic may pass
		# this hook when br_netfilter is loaded on the machine).
		ip saddr 198.18.1.0/24 ip daddr 198.18.1.0/24 accept
		ip saddr 198.18.2.0/24 ip daddr 198.18.2.0/24 accept
		ip saddr 198.18.0.0/24 ip daddr 198.18.0.0/24 accept
		# VPC hosts reach the tunnel port behind the VIP, and nothing else.
		ip saddr { 198.18.1.0/24, 198.18.2.0/24 } ip daddr { 198.18.0.21, 198.18.0.22 } tcp dport %[3]d ct status dnat accept
		# Central reaches the PS nodes (data ports); PS nodes reach central (Redis).
		ip saddr 198.18.3.0/24 ip daddr 198.18.0.0/24 accept
		ip saddr 198.18.0.0/24 ip daddr 198.18.3.0/24 accept
		counter drop
	}
}
`, VIP, VIP2, TunnelPort)
}

func (n *Network) addHost(coreH *netlink.Handle, br *netlink.Bridge, h *Host) error {
	hostNS, err := newNamedNS(h.NS)
	if err != nil {
		return err
	}
	defer hostNS.Close()
	hostH, err := netlink.NewHandleAt(hostNS)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", h.NS, err)
	}
	defer hostH.Close()
	// The veth is created in core with its peer in the host: the host's own
	// namespace is never touched.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "v-" + h.Name, MasterIndex: br.Attrs().Index},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(int(hostNS)),
	}
	if err := coreH.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth for %s: %w", h.Name, err)
	}
	if err := linkUp(coreH, veth.Name); err != nil {
		return err
	}
	if err := linkUp(hostH, "lo"); err != nil {
		return err
	}
	eth, err := hostH.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find eth0 in %s: %w", h.NS, err)
	}
	gw := subnets[h.VPC].gw
	if err := hostH.AddrAdd(eth, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(h.IP, gw.Bits()))}); err != nil {
		return fmt.Errorf("address %s: %w", h.Name, err)
	}
	if err := hostH.LinkSetUp(eth); err != nil {
		return err
	}
	// Only the simulated range is routed: there is no default route out.
	dst := prefixNet(netip.MustParsePrefix("198.18.0.0/15"))
	if err := hostH.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: dst, Gw: gw.Addr().AsSlice()}); err != nil {
		return fmt.Errorf("route in %s: %w", h.Name, err)
	}
	return nil
}

// Command returns a command that runs name inside host's network
// namespace. It enters only the network namespace (nsenter --net), unlike
// `ip netns exec`, which also remounts /sys: the process keeps seeing the
// cgroup2 mount and the bpffs pins of the machine, which the redirector needs.
func (n *Network) Command(host, name string, args ...string) *exec.Cmd {
	nsenter, _ := execpath.Look("nsenter")
	return exec.Command(nsenter, append([]string{"--net=/var/run/netns/" + n.Hosts[host].NS, "--", name}, args...)...)
}

// RunTimeout bounds every Run: a command still running after it is killed
// (by its PID), so a regression shows up as an error, never as a hang.
const RunTimeout = time.Minute

// Run runs a command in host's namespace, for at most RunTimeout, and
// returns its combined output.
func (n *Network) Run(host, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), RunTimeout)
	defer cancel()
	return n.RunContext(ctx, host, name, args...)
}

// RunContext is Run bounded by ctx instead: when ctx ends the command is
// killed and the error says so.
func (n *Network) RunContext(ctx context.Context, host, name string, args ...string) ([]byte, error) {
	nsenter, _ := execpath.Look("nsenter")
	// nsenter --net execs name: killing its PID kills the command.
	cmd := exec.CommandContext(ctx, nsenter, append([]string{"--net=/var/run/netns/" + n.Hosts[host].NS, "--", name}, args...)...)
	// Children that keep the output pipe open cannot hold Run past the
	// kill, and the command dies with us even if we crash.
	cmd.WaitDelay = time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil && ctx.Err() != nil {
		return out, fmt.Errorf("%s on %s: %w (%v)", name, host, ctx.Err(), err)
	}
	return out, err
}

// Proc is a long-running process in a host's namespace.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	log  lockedBuffer
	done chan struct{}
	err  error
}

// Log returns what the process printed so far.
func (p *Proc) Log() string { return p.log.String() }

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Wait waits for the process to end, at most d.
func (p *Proc) Wait(d time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(d):
		return fmt.Errorf("%s still running after %v", p.Name, d)
	}
}

// Stop kills the process (SIGKILL, by PID) and waits for it.
func (p *Proc) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.Cmd.Process.Signal(syscall.SIGCONT)
	_ = p.Cmd.Process.Kill()
	<-p.done
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// StartOpts are optional settings of Start.
type StartOpts struct {
	Env    []string
	Cgroup string // cgroup v2 directory to start the process in
}

// Start starts a long-running process in host's namespace; Close kills it.
func (n *Network) Start(name, host string, opts StartOpts, bin string, args ...string) (*Proc, error) {
	cmd := n.Command(host, bin, args...)
	cmd.Env = append(os.Environ(), opts.Env...)
	p := &Proc{Name: name, Cmd: cmd, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = &p.log, &p.log
	// The process dies with us even if we crash before Close.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var cg *os.File
	if opts.Cgroup != "" {
		// Join the cgroup at clone (CLONE_INTO_CGROUP): the process never
		// runs a single instruction outside it.
		f, err := os.Open(opts.Cgroup)
		if err != nil {
			return nil, fmt.Errorf("open cgroup %s: %w", opts.Cgroup, err)
		}
		cg = f
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(f.Fd())
	}
	err := cmd.Start()
	if cg != nil {
		cg.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, host, err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	n.mu.Lock()
	n.procs = append(n.procs, p)
	n.mu.Unlock()
	return p, nil
}

// Procs returns every process started so far.
func (n *Network) Procs() []*Proc {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]*Proc(nil), n.procs...)
}

// Close kills every process and deletes every namespace (which removes its
// veths, bridges and nftables tables with it).
func (n *Network) Close() error {
	for _, p := range n.Procs() {
		p.Stop()
	}
	var errs []error
	for _, h := range n.Hosts {
		if err := netns.DeleteNamed(h.NS); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete netns %s: %w", h.NS, err))
		}
	}
	if err := deleteByPrefix(n.Prefix); err != nil {
		errs = append(errs, err)
	}
	_ = os.Remove(filepath.Join(stateDir, n.Prefix))
	return errors.Join(errs...)
}

// CleanStale removes the namespaces of earlier runs whose process is gone.
func CleanStale() {
	entries, err := os.ReadDir(stateDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join(stateDir, e.Name())
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		pid, err := strconv.Atoi(lines[0])
		if err == nil && pid > 0 && syscall.Kill(pid, 0) == nil {
			continue // its owner is alive
		}
		for _, ns := range lines[1:] {
			_ = netns.DeleteNamed(ns)
		}
		_ = os.Remove(p)
	}
}

func deleteByPrefix(prefix string) error {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return nil
	}
	var errs []error
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			if err := netns.DeleteNamed(e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// NewPrefix returns a short random prefix for namespace names.
func NewPrefix() string {
	return fmt.Sprintf("tn%04x", uint16(time.Now().UnixNano()^int64(os.Getpid())<<7))
}

// newNamedNS creates a named namespace without leaving this thread in it.
func newNamedNS(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return 0, err
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if serr := netns.Set(orig); serr != nil {
		// The thread is stuck in the wrong namespace; it dies with the
		// locked goroutine instead of serving anyone else.
		panic(fmt.Sprintf("netsim: cannot return to the original netns: %v", serr))
	}
	if err != nil {
		return 0, fmt.Errorf("create netns %s: %w", name, err)
	}
	return h, nil
}

func linkUp(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	return h.LinkSetUp(l)
}

func prefixNet(p netip.Prefix) *net.IPNet {
	a := p.Addr().AsSlice()
	return &net.IPNet{IP: a, Mask: net.CIDRMask(p.Bits(), len(a)*8)}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// WaitTCP waits until host can open a TCP connection to addr.
func (n *Network) WaitTCP(ctx context.Context, host, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		// A dropped SYN would hold the connect for minutes: each attempt
		// is bounded, and so is the whole wait.
		attempt, cancel := context.WithTimeout(ctx, min(2*time.Second, max(time.Until(deadline), 100*time.Millisecond)))
		out, err := n.RunContext(attempt, host, "bash", "-c", "exec 3<>/dev/tcp/"+strings.Replace(addr, ":", "/", 1))
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s cannot reach %s: %v %s", host, addr, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// blackholeTable is the core router's nftables table that silences hosts.
const blackholeTable = "tether_netsim_blackhole"

// Blackhole makes host vanish without a trace, the way a host that loses
// power or its link does: the core router drops every packet from or to
// its address, so no RST or FIN ever reaches its peers. The table lives in
// the core namespace (deleted with it by Close); the returned function
// removes it, bringing host back.
func (n *Network) Blackhole(host string) (restore func() error, err error) {
	ip := n.Hosts[host].IP
	// Priority -10 runs before the forward filter's "ct state established
	// accept", so established flows are cut too.
	rules := fmt.Sprintf(`table ip %[1]s {
	chain forward {
		type filter hook forward priority -10; policy accept;
		ip saddr %[2]s drop
		ip daddr %[2]s drop
	}
}
`, blackholeTable, ip)
	cmd := n.Command("core", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("blackhole %s at the core router: %w: %s", host, err, out)
	}
	return func() error {
		if out, err := n.Run("core", "nft", "delete", "table", "ip", blackholeTable); err != nil {
			return fmt.Errorf("remove the blackhole of %s: %w: %s", host, err, out)
		}
		return nil
	}, nil
}

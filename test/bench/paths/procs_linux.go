package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/test/bench/benchutil"
)

// ---- processes ------------------------------------------------------------------

// process is a proxy process this run started (tether ps or agent, frps
// or frpc); it adds CPU accounting to benchutil's.
type process struct{ *benchutil.Process }

// startProcess starts bin with args, its output in a log file of dir (see
// benchutil.StartProcess).
func startProcess(ctx context.Context, dir, name, bin string, args ...string) (*process, error) {
	bp, err := benchutil.StartProcess(ctx, dir, name, bin, args...)
	if err != nil {
		return nil, err
	}
	return &process{bp}, nil
}

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat:
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// cpuSeconds is the CPU time (user + system, all threads) the process has
// used so far, from /proc/PID/stat.
func (p *process) cpuSeconds() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid()))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", p.Name, err)
	}
	// The command name (field 2) may hold spaces: count fields after it.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("%s: /proc/%d/stat: no command name", p.Name, p.Pid())
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("%s: /proc/%d/stat: %d fields", p.Name, p.Pid(), len(f)+2)
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("%s: /proc/%d/stat: %w", p.Name, p.Pid(), err)
	}
	return float64(utime+stime) / clockTicks, nil
}

// ---- tether columns ---------------------------------------------------------------

// tetherSetup is what every tether column shares: the binary, Redis, the
// credentials, the PKI of the TLS columns, and which data-path flags the
// binary has.
type tetherSetup struct {
	bin, dir   string
	redisURL   string
	psTokens   string // the PS's token file (benchutil.PSCredentials)
	agentToken string // the agent's token file: the token alone
	pki        string // `tether certs init` output
	dataPlane  string // the PS's --data-plane
	pool       bool   // the binary has --data-path/--pool-listen and --pool-size
}

// hasPoolFlags reports whether the tether binary has the pooled data
// path's flags: `ps --data-path` and `--pool-listen`, `agent --pool-size`.
func hasPoolFlags(bin string) bool {
	psHelp, err1 := exec.Command(bin, "ps", "--help").CombinedOutput()
	agentHelp, err2 := exec.Command(bin, "agent", "--help").CombinedOutput()
	return err1 == nil && err2 == nil &&
		strings.Contains(string(psHelp), "--data-path") && strings.Contains(string(psHelp), "--pool-listen") &&
		strings.Contains(string(agentHelp), "--pool-size")
}

// makePKI writes a CA, a PS certificate for 127.0.0.1 and nothing else
// into dir with `tether certs init`: the TLS columns' agents verify the
// PS against the CA and authenticate with the token, as in the plain ones.
func makePKI(bin, dir string) error {
	out, err := exec.Command(bin, "certs", "init", "--dir", dir, "--ps-ip", "127.0.0.1").CombinedOutput()
	if err != nil {
		return fmt.Errorf("tether certs init: %w\n%s", err, out)
	}
	return nil
}

// startTether starts one `tether ps` and one `tether agent` process for
// col, the agent exposing the four services on its own address
// (127.77.0.index), and sets col's addresses to the PS's ports once the
// registry holds the routes.
func (t *tetherSetup) startTether(ctx context.Context, col *column, index int, direct services, firstPort int) error {
	listen, err1 := benchutil.FreeAddr()
	psMetrics, err2 := benchutil.FreeAddr()
	agentMetrics, err3 := benchutil.FreeAddr()
	poolListen, err4 := benchutil.FreeAddr()
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return err
	}
	id := fmt.Sprintf("bench-%d", index)
	psArgs := []string{"ps", "--id", "ps-" + id, "--listen", listen, "--advertise", "127.0.0.1",
		"--ports", fmt.Sprintf("%d-%d", firstPort, firstPort+99), "--data-plane", t.dataPlane,
		"--redis", t.redisURL, "--token-file", t.psTokens, "--agent-cidrs", benchutil.AgentRange,
		"--metrics", psMetrics, "--log-level", "warn"}
	agentIP := netip.AddrFrom4([4]byte{127, 77, 0, byte(index)})
	agentArgs := []string{"agent", "--id", "agent-" + id, "--server", listen, "--tunnels", "1",
		"--ip", agentIP.String(), "--token-file", t.agentToken,
		"--expose", "1=" + direct.up, "--expose", "2=" + direct.down,
		"--expose", "3=" + direct.echo, "--expose", "4=" + direct.rpc,
		"--metrics", agentMetrics, "--log-level", "warn"}
	if col.tls {
		psArgs = append(psArgs, "--tls-cert", filepath.Join(t.pki, "ps.pem"), "--tls-key", filepath.Join(t.pki, "ps-key.pem"))
		agentArgs = append(agentArgs, "--tls-ca", filepath.Join(t.pki, "ca.pem"))
	}
	// With the pool flags present the PS's default (auto) would pool the mux
	// columns too: each column names its path.
	if t.pool {
		if col.pool {
			psArgs = append(psArgs, "--data-path", "pool", "--pool-listen", poolListen)
			agentArgs = append(agentArgs, "--pool-size", strconv.Itoa(poolSize))
		} else {
			psArgs = append(psArgs, "--data-path", "mux", "--pool-listen", "")
			agentArgs = append(agentArgs, "--pool-size", "0")
		}
	}
	psProc, err := startProcess(ctx, t.dir, "ps-"+id, t.bin, psArgs...)
	if err != nil {
		return err
	}
	psProc.Metrics = psMetrics
	col.procs = append(col.procs, psProc)
	if err := psProc.WaitReady(30 * time.Second); err != nil {
		return err
	}
	agentProc, err := startProcess(ctx, t.dir, "agent-"+id, t.bin, agentArgs...)
	if err != nil {
		return err
	}
	agentProc.Metrics = agentMetrics
	col.procs = append(col.procs, agentProc)
	if err := agentProc.WaitReady(30 * time.Second); err != nil {
		return err
	}
	col.ps = psProc
	return t.waitRoutes(ctx, agentIP, &col.addrs)
}

// waitRoutes waits until the registry holds a backend for each of the four
// endpoints of the agent at agentIP and sets via to the PS's ports: the
// clients dial the PS's data port directly, as a redirected client would.
func (t *tetherSetup) waitRoutes(ctx context.Context, agentIP netip.Addr, via *services) error {
	reg, err := registry.New(registry.Config{URL: t.redisURL, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer reg.Close()
	for port, dst := range map[uint16]*string{1: &via.up, 2: &via.down, 3: &via.echo, 4: &via.rpc} {
		target := netip.AddrPortFrom(agentIP, port)
		deadline := time.Now().Add(15 * time.Second)
		for {
			rt, err := reg.Get(ctx, target)
			if err == nil && len(rt.Backends) == 1 {
				*dst = rt.Backends[0].Address.String()
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("route %s did not get its backend: %v", target, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// poolSize is the agents' --pool-size in the pool columns.
const poolSize = 16

// ---- frp columns ------------------------------------------------------------------

// startFRP starts frps and frpc from frpDir for col, configured as issue 14
// measured them: frps bindAddr 127.0.0.1; frpc one tcp proxy per service
// (localIP/localPort/remotePort), natHoleStunServer on 127.0.0.1 so
// nothing leaves the host, and transport.tls.enable = false for the TLS-off
// column; everything else default (TLS on, tcpMux on).
func startFRP(ctx context.Context, dir, frpDir string, col *column, direct services) error {
	bind, err := benchutil.FreeAddr()
	if err != nil {
		return err
	}
	_, bindPort, _ := net.SplitHostPort(bind)
	name := strings.NewReplacer(" ", "-", "(", "", ")", "").Replace(col.name)
	frpsConf := filepath.Join(dir, name+"-frps.toml")
	if err := os.WriteFile(frpsConf, []byte(fmt.Sprintf("bindAddr = \"127.0.0.1\"\nbindPort = %s\n", bindPort)), 0o600); err != nil {
		return err
	}
	var c strings.Builder
	fmt.Fprintf(&c, "serverAddr = \"127.0.0.1\"\nserverPort = %s\nnatHoleStunServer = \"127.0.0.1:3478\"\n", bindPort)
	if !col.tls {
		c.WriteString("transport.tls.enable = false\n")
	}
	remote := map[string]*string{}
	for _, s := range []struct {
		name  string
		local string
		dst   *string
	}{{"up", direct.up, &col.addrs.up}, {"down", direct.down, &col.addrs.down}, {"echo", direct.echo, &col.addrs.echo}, {"rpc", direct.rpc, &col.addrs.rpc}} {
		r, err := benchutil.FreeAddr()
		if err != nil {
			return err
		}
		lhost, lport, _ := net.SplitHostPort(s.local)
		_, rport, _ := net.SplitHostPort(r)
		fmt.Fprintf(&c, "\n[[proxies]]\nname = %q\ntype = \"tcp\"\nlocalIP = %q\nlocalPort = %s\nremotePort = %s\n", s.name, lhost, lport, rport)
		*s.dst = r
		remote[s.name] = s.dst
	}
	frpcConf := filepath.Join(dir, name+"-frpc.toml")
	if err := os.WriteFile(frpcConf, []byte(c.String()), 0o600); err != nil {
		return err
	}
	frps, err := startProcess(ctx, dir, name+"-frps", filepath.Join(frpDir, "frps"), "-c", frpsConf)
	if err != nil {
		return err
	}
	col.procs = append(col.procs, frps)
	if err := waitDial(frps, bind, 15*time.Second); err != nil {
		return err
	}
	frpc, err := startProcess(ctx, dir, name+"-frpc", filepath.Join(frpDir, "frpc"), "-c", frpcConf)
	if err != nil {
		return err
	}
	col.procs = append(col.procs, frpc)
	// A proxy is up when its remote port answers a request end to end.
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		err := oneShot(col.addrs.rpc, uint64(i))
		if err == nil {
			break
		}
		if e := errors.Join(frps.Exited(), frpc.Exited()); e != nil {
			return e
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: the rpc proxy did not answer: %v\n%s", col.name, err, frpc.LogTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, a := range []string{col.addrs.up, col.addrs.down, col.addrs.echo} {
		if err := waitDial(frpc, a, 20*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// waitDial waits until addr accepts a connection (p must not exit
// meanwhile).
func waitDial(p *process, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if err := p.Exited(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %s does not accept after %v: %v\n%s", p.Name, addr, timeout, err, p.LogTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

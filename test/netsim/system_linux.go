package netsim

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Agents are the hosts that run an agent, with the servers each is given:
// always the VIP, never a PS address; a2 gets a DNS-style list of two VIP
// addresses.
var Agents = map[string][]string{
	"a1": {"198.18.0.10:7000"},
	"a2": {"198.18.0.10:7000", "198.18.0.11:7000"},
	"b1": {"198.18.0.10:7000"},
}

// AgentPort is the port of every agent host's service.
const AgentPort = 8080

// Lease is the PS nodes' route lease (--lease); they renew every 500 ms.
const Lease = 3 * time.Second

// RedisURL is where the central Redis listens.
const RedisURL = "redis://198.18.3.10:6379/0"

// System is tether running on a Network: Redis on central, two PS nodes,
// an agent and a service on every agent host, and the redirector on central
// attached to the client cgroup.
type System struct {
	N      *Network
	Tether string // the tether binary
	Dir    string // tokens, Redis data
	Cgroup string // the client cgroup the redirector serves
	PinDir string
	Procs  map[string]*Proc
	Token  string
	// DataPlanes, by PS node name, is the --data-plane a node starts with;
	// a node not named gets sk_lookup (asked for by name, so a plane that
	// cannot load fails the start instead of falling back quietly).
	DataPlanes map[string]string
}

// NewSystem prepares a system; nothing runs yet.
func NewSystem(n *Network, tether, dir, cgroup, pinDir string) (*System, error) {
	s := &System{N: n, Tether: tether, Dir: dir, Cgroup: cgroup, PinDir: pinDir, Procs: map[string]*Proc{}, Token: "netsim-" + n.Prefix, DataPlanes: map[string]string{}}
	if err := os.WriteFile(s.TokenFile(), []byte(s.Token+" * 198.18.0.0/15\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(s.AgentTokenFile(), []byte(s.Token+"\n"), 0o600); err != nil {
		return nil, err
	}
	return s, nil
}

// TokenFile is the PS nodes' token file; AgentTokenFile the agents'.
func (s *System) TokenFile() string      { return filepath.Join(s.Dir, "tokens") }
func (s *System) AgentTokenFile() string { return filepath.Join(s.Dir, "agent-token") }

// StartAll starts Redis, both PS nodes, every agent and its service, waits
// for every route to have two backends, then starts the redirector and
// waits for its map. self is a program that calls MaybeServeIdentity.
func (s *System) StartAll(ctx context.Context, self string) error {
	if err := s.StartRedis(ctx); err != nil {
		return err
	}
	for _, ps := range []string{"ps1", "ps2"} {
		if _, err := s.StartPS(ps); err != nil {
			return err
		}
	}
	for host := range Agents {
		addr := s.Target(host)
		if _, err := s.start("http-"+host, host, StartOpts{Env: []string{IdentityEnvFor(addr, host)}}, self); err != nil {
			return err
		}
		if _, err := s.StartAgent(host); err != nil {
			return err
		}
	}
	for host := range Agents {
		if _, err := s.WaitBackends(ctx, s.Target(host), 2, 30*time.Second); err != nil {
			return err
		}
	}
	if _, err := s.StartRedirector(); err != nil {
		return err
	}
	return s.WaitRedirector(ctx, len(Agents), 20*time.Second)
}

func (s *System) start(name, host string, opts StartOpts, bin string, args ...string) (*Proc, error) {
	p, err := s.N.Start(name, host, opts, bin, args...)
	if err != nil {
		return nil, err
	}
	s.Procs[name] = p
	return p, nil
}

// StartRedis starts (or restarts, on the same data) Redis on central.
func (s *System) StartRedis(ctx context.Context) error {
	if _, err := s.start("redis", "central", StartOpts{}, "redis-server", "--bind", "198.18.3.10", "--port", "6379",
		"--dir", s.Dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"); err != nil {
		return err
	}
	return s.N.WaitTCP(ctx, "central", "198.18.3.10:6379", 10*time.Second)
}

// StartPS starts the PS node name (ps1 or ps2) on its host.
func (s *System) StartPS(name string) (*Proc, error) {
	ip := s.N.Hosts[name].IP.String()
	plane := s.DataPlanes[name]
	if plane == "" {
		plane = "sk_lookup"
	}
	return s.start(name, name, StartOpts{}, s.Tether, "ps", "--id", name, "--listen", ip+":7000", "--advertise", ip, "--data-plane", plane,
		"--ports", fmt.Sprintf("%d-%d", PortsFirst, PortsLast), "--redis", RedisURL, "--token-file", s.TokenFile(),
		"--allow-clients", "198.18.3.0/24", "--lease", Lease.String(), "--renew", "500ms", "--drain-timeout", "5s",
		"--metrics", ip+":"+fmt.Sprint(PSMetricsPort))
}

// PortsFirst and PortsLast bound each PS node's data ports (--ports).
const (
	PortsFirst = 20000
	PortsLast  = 24999
)

// PSMetricsPort is where each PS node serves /metrics, on its own IP.
const PSMetricsPort = 9101

// StartAgent starts the agent of host, exposing its service.
func (s *System) StartAgent(host string, extra ...string) (*Proc, error) {
	args := []string{"agent", "--id", host, "--ip", s.N.Hosts[host].IP.String(), "--expose", fmt.Sprint(AgentPort),
		"--token-file", s.AgentTokenFile(), "--backoff-min", "100ms", "--backoff-max", "1s"}
	for _, srv := range Agents[host] {
		args = append(args, "--server", srv)
	}
	return s.start("agent-"+host, host, StartOpts{}, s.Tether, append(args, extra...)...)
}

// StartRedirector starts the redirector on central for the client cgroup.
func (s *System) StartRedirector() (*Proc, error) {
	return s.start("redirector", "central", StartOpts{}, s.Tether, "redirector", "--redis", RedisURL,
		"--cgroup", s.Cgroup, "--pin-dir", s.PinDir, "--map-size", "100000", "--resync", "10s")
}

// Target is host's service address, the one clients dial.
func (s *System) Target(host string) string {
	return fmt.Sprintf("%s:%d", s.N.Hosts[host].IP, AgentPort)
}

// RouteJSON is `tether routes get -o json`.
type RouteJSON struct {
	Target   string `json:"target"`
	Backends []struct {
		PSID    string `json:"ps_id"`
		Address string `json:"address"`
		AgentID string `json:"agent_id"`
	} `json:"backends"`
}

// Route runs `tether routes get target` on central.
func (s *System) Route(target string) (RouteJSON, error) {
	var r RouteJSON
	out, err := s.N.Run("central", s.Tether, "routes", "get", target, "--redis", RedisURL, "-o", "json")
	if err != nil {
		return r, fmt.Errorf("%v: %s", err, out)
	}
	return r, json.Unmarshal(out, &r)
}

// WaitBackends waits until target has n backends on n distinct PS nodes.
func (s *System) WaitBackends(ctx context.Context, target string, n int, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	var last error
	for time.Since(start) < timeout && ctx.Err() == nil {
		r, err := s.Route(target)
		if err == nil {
			ps := map[string]bool{}
			for _, b := range r.Backends {
				ps[b.PSID] = true
			}
			if len(r.Backends) == n && len(ps) == n {
				return time.Since(start), nil
			}
			err = fmt.Errorf("backends %+v", r.Backends)
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return 0, fmt.Errorf("%s never had %d backends: %v", target, n, last)
}

// WaitRedirector waits until the redirector's map holds at least n routes.
func (s *System) WaitRedirector(ctx context.Context, n int, timeout time.Duration) error {
	start := time.Now()
	var last string
	for time.Since(start) < timeout && ctx.Err() == nil {
		if p := s.Procs["redirector"]; p != nil && p.Exited() {
			return fmt.Errorf("redirector exited:\n%s", p.Log())
		}
		out, err := exec.Command(s.Tether, "redirector", "status", "--pin-dir", s.PinDir, "-o", "json").CombinedOutput()
		var st struct {
			Routes int `json:"routes"`
		}
		if err == nil && json.Unmarshal(out, &st) == nil && st.Routes >= n {
			return nil
		}
		last = strings.TrimSpace(string(out))
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("redirector map never held %d routes: %s", n, last)
}

// ClientCommand is a command on central, inside the client cgroup when
// inCgroup is set. Call the returned cleanup after Start/Run.
func (s *System) ClientCommand(inCgroup bool, name string, args ...string) (*exec.Cmd, func(), error) {
	cmd := s.N.Command("central", name, args...)
	if !inCgroup {
		return cmd, func() {}, nil
	}
	f, err := os.Open(s.Cgroup)
	if err != nil {
		return nil, nil, err
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	return cmd, func() { f.Close() }, nil
}

// Curl runs a plain curl on central, in the client cgroup or not.
func (s *System) Curl(inCgroup bool, url string) (string, error) {
	cmd, done, err := s.ClientCommand(inCgroup, "curl", "-sS", "--max-time", "3", url)
	if err != nil {
		return "", err
	}
	defer done()
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// Uninstall removes the redirector's pins and attachments.
func (s *System) Uninstall() error {
	out, err := exec.Command(s.Tether, "redirector", "uninstall", "--cgroup", s.Cgroup, "--pin-dir", s.PinDir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("uninstall: %v: %s", err, out)
	}
	return nil
}

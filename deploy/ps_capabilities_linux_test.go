package deploy

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
)

// psUser is the ordinary uid and gid the PS runs as in these tests, as the
// unit's User=tether does: the capabilities reach it as ambient ones, the
// only way a non-root process keeps them across exec.
const psUser = 65534

// capabilityHint is what the PS says when sk_lookup is refused for want of
// a capability (ps/skplane_linux.go).
const capabilityHint = "needs CAP_BPF and CAP_NET_ADMIN"

// psHarness runs the real tether binary as psUser under setpriv, in this
// test binary's own network namespace (TestMain), against a real Redis.
type psHarness struct {
	setpriv, bin, tokens, redisURL string
	runs                           int
}

// newPSHarness builds tether where psUser can execute it and writes the
// token file as the unit's deployment does (root:group 0640).
func newPSHarness(t *testing.T) *psHarness {
	t.Helper()
	testutil.RequirePrivateNetns(t)
	setpriv := testutil.RequireBinary(t, "setpriv")
	// t.TempDir is 0700 root: the PS user could not reach the binary.
	dir, err := os.MkdirTemp("", "tether-deploy-ps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin, err := testutil.BuildTether(dir)
	if err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokens, []byte(tunneltest.Token+" * "+tunneltest.AgentRange+"\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(tokens, 0, psUser); err != nil {
		t.Fatal(err)
	}
	return &psHarness{setpriv: setpriv, bin: bin, tokens: tokens, redisURL: testutil.StartRedis(t).URL()}
}

// psProc is one PS process and where it listens.
type psProc struct {
	*testutil.Proc
	listen, metrics string
}

// start runs `tether ps --data-plane plane` as psUser with exactly caps in
// its bounding, inheritable and ambient (hence permitted and effective)
// sets and no_new_privs: what systemd gives the unit's User= with
// AmbientCapabilities=, CapabilityBoundingSet= and NoNewPrivileges=yes.
func (h *psHarness) start(t *testing.T, caps []string, plane string) *psProc {
	t.Helper()
	h.runs++
	set := setprivCaps(caps)
	uid := strconv.Itoa(psUser)
	p := &psProc{
		listen:  fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)),
		metrics: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)),
	}
	p.Proc = testutil.StartProc(t, fmt.Sprintf("ps %s %s", plane, set), nil, h.setpriv,
		"--reuid="+uid, "--regid="+uid, "--clear-groups", "--no-new-privs",
		"--bounding-set="+set, "--inh-caps="+set, "--ambient-caps="+set, "--",
		h.bin, "ps",
		"--id", fmt.Sprintf("ps-deploy-%d", h.runs), // one live instance per id: a fresh one per run
		"--listen", p.listen,
		"--advertise", "127.0.0.1",
		"--ports", tunneltest.FreeRange(t, 10),
		"--data-plane", plane,
		"--redis", h.redisURL,
		"--token-file", h.tokens,
		"--agent-cidrs", tunneltest.AgentRange,
		"--metrics", p.metrics,
		"--lease", "2s", "--renew", "500ms", "--drain-timeout", "1s")
	return p
}

// waitRunning waits for "ps running" and returns the data plane metric of
// each plane.
func (p *psProc) waitRunning(t *testing.T, what string) (skLookup, listeners float64) {
	t.Helper()
	testutil.Eventually(t, 20*time.Second, what+": ps running with /metrics", func() error {
		select {
		case <-p.Done():
			return fmt.Errorf("the PS exited: %s", p.Output())
		default:
		}
		if !strings.Contains(p.Output(), `msg="ps running"`) {
			return fmt.Errorf("no \"ps running\" yet")
		}
		c, err := net.DialTimeout("tcp", p.metrics, time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	g := testutil.Scrape(t, p.metrics)
	return testutil.MetricValue(t, g, "tether_ps_data_plane", "plane", "sk_lookup"),
		testutil.MetricValue(t, g, "tether_ps_data_plane", "plane", "listeners")
}

// stop sends SIGTERM and wants a clean exit.
func (p *psProc) stop(t *testing.T, what string) {
	t.Helper()
	p.Stop()
	if code := p.Cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("%s: the PS exited %d on SIGTERM:\n%s", what, code, p.Output())
	}
}

// reachAgent starts an agent exposing an identity server through the PS and
// asks the endpoint's published backend (address, port) who answers.
func reachAgent(t *testing.T, p *psProc, redisURL, agentID string, target netip.AddrPort) netip.AddrPort {
	t.Helper()
	reg := tunneltest.NewRegistry(t, redisURL)
	_, _, stopAgent := tunneltest.StartAgent(t, agentID, target.Addr().String(), []string{p.listen},
		[]string{fmt.Sprintf("%d=%s", target.Port(), tunneltest.IdentityServer(t, agentID))}, nil)
	t.Cleanup(stopAgent)
	backend := tunneltest.WaitBackends(t, reg, target, 1)[0].Address
	got, err := tunneltest.Ask(backend.String())
	if err != nil || got != agentID {
		t.Fatalf("through the PS at %s: got %q, %v; want %q", backend, got, err, agentID)
	}
	return backend
}

// listeningOn reports whether a TCP socket of this network namespace listens
// on port (any address), from /proc/net/tcp and tcp6.
func listeningOn(t *testing.T, port uint16) bool {
	t.Helper()
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		file, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			// sl local_address rem_address st ...; st 0A is LISTEN.
			if len(fields) < 4 || fields[3] != "0A" {
				continue
			}
			_, hexPort, ok := strings.Cut(fields[1], ":")
			if p, err := strconv.ParseUint(hexPort, 16, 16); ok && err == nil && uint16(p) == port {
				file.Close()
				return true
			}
		}
		file.Close()
	}
	return false
}

// unitCapabilities is the capability set the PS unit grants: positive,
// the same in the bounding and the ambient set.
func unitCapabilities(t *testing.T, role string) []string {
	t.Helper()
	data, err := os.ReadFile(unitPath(role))
	if err != nil {
		t.Fatal(err)
	}
	ds, err := parseUnit(data)
	if err != nil {
		t.Fatal(err)
	}
	bounding, inverted := capabilitySet(values(ds, "Service", "CapabilityBoundingSet"))
	ambient, _ := capabilitySet(values(ds, "Service", "AmbientCapabilities"))
	if inverted || len(bounding) == 0 {
		t.Fatalf("%s: want a positive CapabilityBoundingSet, got %q", unitPath(role), values(ds, "Service", "CapabilityBoundingSet"))
	}
	slices.Sort(bounding)
	slices.Sort(ambient)
	if !slices.Equal(bounding, ambient) {
		t.Fatalf("%s: AmbientCapabilities %v differ from CapabilityBoundingSet %v: an ordinary user gets only the ambient ones", unitPath(role), ambient, bounding)
	}
	return bounding
}

// The PS unit grants CAP_BPF and CAP_NET_ADMIN and nothing else. Under
// exactly that set, as an ordinary user, `tether ps --data-plane sk_lookup`
// loads its steering program, reports the plane, and carries a client to
// an agent's endpoint through a pair no socket listens on (the program
// steered it); after a stop the pair is refused (nothing stale is left
// steering). With either capability removed it refuses to start, saying
// which capabilities it needs: the set is the least one.
func TestPSSKLookupRunsWithExactlyItsUnitCapabilities(t *testing.T) {
	h := newPSHarness(t)
	caps := unitCapabilities(t, "ps")

	p := h.start(t, caps, "sk_lookup")
	sk, ln := p.waitRunning(t, fmt.Sprintf("sk_lookup under %v", caps))
	if sk != 1 || ln != 0 {
		t.Fatalf("under %v: tether_ps_data_plane sk_lookup=%v listeners=%v, want 1 and 0\n%s", caps, sk, ln, p.Output())
	}
	if !strings.Contains(p.Output(), "data_plane=sk_lookup") {
		t.Errorf("under %v: \"ps running\" does not say data_plane=sk_lookup:\n%s", caps, p.Output())
	}
	backend := reachAgent(t, p, h.redisURL, "agent-a1", netip.MustParseAddrPort("127.77.0.1:9100"))
	if listeningOn(t, backend.Port()) {
		t.Errorf("a socket listens on data port %d: the connection may not have been steered by sk_lookup", backend.Port())
	}
	p.stop(t, "sk_lookup")
	if c, err := net.DialTimeout("tcp", backend.String(), 2*time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts after the PS stopped: stale steering", backend)
	}

	for _, drop := range caps {
		t.Run("without "+drop, func(t *testing.T) {
			fewer := slices.DeleteFunc(slices.Clone(caps), func(c string) bool { return c == drop })
			p := h.start(t, fewer, "sk_lookup")
			select {
			case <-p.Done():
				if p.Cmd.ProcessState.ExitCode() == 0 {
					t.Fatalf("without %s the PS exited 0:\n%s", drop, p.Output())
				}
				if out := p.Output(); !strings.Contains(out, capabilityHint) {
					t.Fatalf("without %s the PS failed, but without saying it %s:\n%s", drop, capabilityHint, out)
				}
				t.Logf("without %s: %s", drop, lastLine(p.Output()))
			case <-time.After(15 * time.Second):
				t.Fatalf("without %s the PS still runs sk_lookup after 15 s: %s is not needed and should leave the unit\n%s", drop, drop, p.Output())
			}
		})
	}
}

// With no capability at all (a unit with both lines emptied), auto falls
// back to a listening socket per port, logs why, and still carries clients;
// --data-plane listeners needs none and tries nothing.
func TestPSAutoWithoutCapabilitiesFallsBackToListeners(t *testing.T) {
	h := newPSHarness(t)

	p := h.start(t, nil, "auto")
	sk, ln := p.waitRunning(t, "auto with no capability")
	if sk != 0 || ln != 1 {
		t.Fatalf("auto with no capability: tether_ps_data_plane sk_lookup=%v listeners=%v, want 0 and 1\n%s", sk, ln, p.Output())
	}
	out := p.Output()
	if !strings.Contains(out, "data plane: sk_lookup unavailable, falling back") || !strings.Contains(out, capabilityHint) {
		t.Fatalf("auto with no capability: the fallback is not logged with its reason (%q):\n%s", capabilityHint, out)
	}
	backend := reachAgent(t, p, h.redisURL, "agent-a2", netip.MustParseAddrPort("127.77.0.2:9100"))
	if !listeningOn(t, backend.Port()) {
		t.Errorf("listeners plane: no socket listens on data port %d", backend.Port())
	}
	p.stop(t, "auto")

	p = h.start(t, nil, "listeners")
	sk, ln = p.waitRunning(t, "listeners with no capability")
	if sk != 0 || ln != 1 {
		t.Fatalf("listeners: tether_ps_data_plane sk_lookup=%v listeners=%v, want 0 and 1\n%s", sk, ln, p.Output())
	}
	if strings.Contains(p.Output(), "sk_lookup unavailable") {
		t.Errorf("--data-plane listeners tried sk_lookup:\n%s", p.Output())
	}
	p.stop(t, "listeners")
}

package deploy

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/registry"
)

// setprivCaps turns unit capability names (CAP_NET_ADMIN) into setpriv's
// list syntax (+net_admin), dropping everything else first.
func setprivCaps(caps []string) string {
	out := "-all"
	for _, c := range caps {
		out += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	return out
}

// startRedirectorWithCaps runs `tether redirector` as uid 0 with exactly
// caps in its bounding, inheritable, ambient (hence permitted and
// effective) sets and no_new_privs: what systemd gives a root service with
// CapabilityBoundingSet= and NoNewPrivileges=yes.
func startRedirectorWithCaps(t *testing.T, setpriv, bin string, caps []string, redisURL, cgroup, pinDir, metrics string) *testutil.Proc {
	t.Helper()
	set := setprivCaps(caps)
	return testutil.StartProc(t, "redirector "+set, nil, setpriv,
		"--no-new-privs", "--bounding-set="+set, "--inh-caps="+set, "--ambient-caps="+set, "--",
		bin, "redirector", "--redis", redisURL, "--cgroup", cgroup, "--pin-dir", pinDir, "--metrics", metrics)
}

// routesGauge matches "tether_redirector_routes 1" in the text exposition.
var routesGauge = regexp.MustCompile(`(?m)^tether_redirector_routes ([0-9.e+]+)$`)

// kernelRoutes reads the redirector's count of routes in the kernel map.
func kernelRoutes(addr string) (string, error) {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	m := routesGauge.FindSubmatch(body)
	if m == nil {
		return "", fmt.Errorf("no tether_redirector_routes in /metrics")
	}
	return string(m[1]), nil
}

// The redirector's unit grants CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and
// nothing else. Under exactly that set the redirector installs its programs
// (with the iter/tcp socket destroyer, not the netlink fallback), writes a
// route into the kernel map, stops cleanly, and starts again over its own
// pins (the upgrade path). With any one of them removed it cannot start:
// the set is the least one.
func TestRedirectorRunsWithExactlyItsUnitCapabilities(t *testing.T) {
	testutil.RequirePrivileged(t)
	setpriv := testutil.RequireBinary(t, "setpriv")
	data, err := os.ReadFile(unitPath("redirector"))
	if err != nil {
		t.Fatal(err)
	}
	ds, err := parseUnit(data)
	if err != nil {
		t.Fatal(err)
	}
	caps, inverted := capabilitySet(values(ds, "Service", "CapabilityBoundingSet"))
	if inverted || len(caps) == 0 {
		t.Fatalf("tether-redirector.service: want a positive CapabilityBoundingSet, got %q", values(ds, "Service", "CapabilityBoundingSet"))
	}
	bin, err := testutil.BuildTether(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rd := testutil.StartRedis(t)
	cg := testutil.NewCgroup(t)
	pinDir := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tether-deploy"))
	t.Cleanup(func() {
		// With full privileges: whatever a run left behind goes.
		if _, err := os.Stat(pinDir); err == nil {
			if out, err := runTether(bin, "redirector", "uninstall", "--pin-dir", pinDir); err != nil {
				t.Errorf("uninstall %s: %v\n%s", pinDir, err, out)
			}
		}
		_ = os.RemoveAll(pinDir)
	})

	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	ctx := context.Background()
	if err := reg.RenewPS(ctx, registry.PSLease{ID: "ps1", Addr: netip.MustParseAddr("198.18.0.21"), State: registry.PSActive, ExpiresAt: time.Now().Add(10 * time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Publish(ctx, "ps1", []registry.Publication{{Target: netip.MustParseAddrPort("198.18.1.11:9100"), Port: 20001, AgentID: "a1"}}); err != nil {
		t.Fatal(err)
	}

	for run := 1; run <= 2; run++ { // the second run starts over the first one's pins
		metrics := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
		p := startRedirectorWithCaps(t, setpriv, bin, caps, rd.URL(), cg.Path, pinDir, metrics)
		testutil.Eventually(t, 20*time.Second, fmt.Sprintf("run %d: the route in the kernel map under %v", run, caps), func() error {
			select {
			case <-p.Done():
				return fmt.Errorf("the redirector exited: %s", p.Output())
			default:
			}
			n, err := kernelRoutes(metrics)
			if err != nil {
				return err
			}
			if n != "1" {
				return fmt.Errorf("tether_redirector_routes %s, want 1", n)
			}
			return nil
		})
		if strings.Contains(p.Output(), "bpf_sock_destroy is not available") {
			t.Errorf("run %d: under %v the socket destroyer fell back to netlink (a capability is missing for the iter/tcp program):\n%s", run, caps, p.Output())
		}
		p.Stop()
		if code := p.Cmd.ProcessState.ExitCode(); code != 0 {
			t.Fatalf("run %d: the redirector exited %d on SIGTERM:\n%s", run, code, p.Output())
		}
	}

	for _, drop := range caps {
		t.Run("without "+drop, func(t *testing.T) {
			var fewer []string
			for _, c := range caps {
				if c != drop {
					fewer = append(fewer, c)
				}
			}
			metrics := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
			p := startRedirectorWithCaps(t, setpriv, bin, fewer, rd.URL(), cg.Path, pinDir, metrics)
			select {
			case <-p.Done():
				if p.Cmd.ProcessState.ExitCode() == 0 {
					t.Fatalf("without %s the redirector exited 0:\n%s", drop, p.Output())
				}
				// Refused for want of the capability, not for another reason.
				if out := p.Output(); !strings.Contains(out, "operation not permitted") && !strings.Contains(out, "permission denied") {
					t.Fatalf("without %s the redirector failed, but not with a permission error:\n%s", drop, out)
				}
				t.Logf("without %s: %s", drop, lastLine(p.Output()))
			case <-time.After(15 * time.Second):
				t.Fatalf("without %s the redirector still runs after 15 s: %s is not needed and should leave the unit\n%s", drop, drop, p.Output())
			}
		})
	}
}

// runTether runs the tether binary with full privileges (cleanup).
func runTether(bin string, args ...string) ([]byte, error) {
	return exec.Command(bin, args...).CombinedOutput()
}

// lastLine is the last line of a process's output: its error.
func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndex(s, "\n")+1:]
}

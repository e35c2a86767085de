package container_test

import (
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/cgroup2"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
)

const (
	// agentCIDR is the loopback range the test's agent exposes its target
	// in; the PS and the redirector must name it, as loopback is refused
	// unless named.
	agentCIDR = "127.77.0.0/16"
	agentIP   = "127.77.0.1"
	// targetPort is the port of the agent's target, dialed by its own IP.
	targetPort = 9100
	// nonRootUID is the image's USER: the PS and the agent keep it.
	nonRootUID = 65532
	// token is the agents' credential: the test runs with tokens, as
	// production does, never --insecure.
	token = "tether-container-test-token"
)

// redirectorCaps is the least the redirector needs, measured here (each is
// taken away in turn below, and the redirector then fails to start):
// CAP_BPF to load programs and create maps, CAP_NET_ADMIN to load and
// attach cgroup socket programs, CAP_PERFMON for the pointer arithmetic the
// verifier allows only to "root" and for the iter/tcp program that destroys
// sockets. No CAP_SYS_ADMIN: bpffs is mounted by the host, not by us.
var redirectorCaps = []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}

// capBits are the capability numbers of linux/capability.h.
var capBits = map[string]uint{"CAP_NET_ADMIN": 12, "CAP_PERFMON": 38, "CAP_BPF": 39}

// redirectorSeccomp is the seccomp profile the redirector runs under.
// Runtimes' default profiles (podman's, containerd's RuntimeDefault) allow
// bpf() only to containers holding CAP_SYS_ADMIN; the alternative to this
// is that profile plus CAP_SYS_ADMIN, which grants far more than the
// syscall. The negative case below shows the default profile refuses.
const redirectorSeccomp = "seccomp=unconfined"

// sandbox is what every tether container gets, the same for every role:
// the host's network (agents dial out, the PS listens on the host's
// addresses, the redirector reaches Redis), a read-only root, no
// capabilities unless added, and no privilege gained by exec.
var sandbox = []string{"--network", "host", "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges"}

// The image built as `make image` builds it runs the real job: a PS and an
// agent in containers as a non-root user, the redirector in a container
// with only redirectorCaps, the bpffs and cgroup2 mounts; an unmodified
// curl in the redirector's cgroup on the host reaches the agent's target by
// the agent's IP, and the same curl outside that cgroup does not.
func TestTheImageRunsTheRealJobFromContainers(t *testing.T) {
	testutil.RequirePrivileged(t)
	curl := testutil.RequireBinary(t, "curl")
	p := newPodman(t)
	img := buildImage(t, p)

	rd := testutil.StartRedis(t)
	secrets := t.TempDir()
	// 0644: the containers' user (65532) reads them. In Kubernetes the
	// Secret volume's defaultMode and fsGroup do this.
	psTokens := filepath.Join(secrets, "ps-tokens")
	writeFile(t, psTokens, token+" * "+agentCIDR+"\n", 0o644)
	agentToken := filepath.Join(secrets, "agent-token")
	writeFile(t, agentToken, token+"\n", 0o644)

	// The agent's local service, on the host: the agent in its container
	// dials it over the host network.
	service := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "agent-a1")
	}))
	t.Cleanup(service.Close)
	serviceAddr := strings.TrimPrefix(service.URL, "http://")

	name := testutil.UniqueName("tc")
	psListen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	ps := p.start(name+"-ps", append(slices.Clone(sandbox),
		"-v", psTokens+":/etc/tether/tokens:ro",
		img, "ps", "--id", "ps1", "--listen", psListen, "--advertise", "127.0.0.1",
		// The container shares the host's network namespace: the
		// sk_lookup data plane would attach to it (without capabilities it
		// could not load anyway, and auto would fall back).
		"--data-plane", "listeners",
		"--ports", tunneltest.FreeRange(t, 10), "--redis", rd.URL(),
		"--token-file", "/etc/tether/tokens", "--agent-cidrs", agentCIDR)...)
	testutil.WaitTCP(t, psListen, 30*time.Second)

	agent := p.start(name+"-agent", append(slices.Clone(sandbox),
		"-v", agentToken+":/etc/tether/token:ro",
		img, "agent", "--server", psListen, "--tunnels", "1", "--id", "a1", "--ip", agentIP,
		"--expose", fmt.Sprintf("%d=%s", targetPort, serviceAddr), "--token-file", "/etc/tether/token")...)

	cg := testutil.NewCgroup(t)
	mnt, err := cgroup2.Mount()
	if err != nil {
		t.Fatal(err)
	}
	rs := redirectorSetup{p: p, img: img, redis: rd.URL(), cgroupMount: mnt, cgroup: cg.Path,
		hostTether: filepath.Join(p.dir, "image", "tether")}
	t.Run("the redirector needs every one of its capabilities and an unconfined seccomp profile", func(t *testing.T) {
		for _, missing := range redirectorCaps {
			caps := slices.DeleteFunc(slices.Clone(redirectorCaps), func(c string) bool { return c == missing })
			rs.mustNotStart(t, "without "+missing, caps, redirectorSeccomp)
		}
		rs.mustNotStart(t, "under the runtime's default seccomp profile", redirectorCaps, "")
	})
	redirector := rs.start(t, name+"-redirector", redirectorCaps, redirectorSeccomp)

	target := fmt.Sprintf("http://%s:%d/", agentIP, targetPort)
	start := time.Now()
	testutil.Eventually(t, 60*time.Second, "curl in the redirector's cgroup reaches the agent's target by its IP", func() error {
		out, err := cg.Run(t, curl, "-sS", "--max-time", "3", target)
		if err != nil || strings.TrimSpace(string(out)) != "agent-a1" {
			return fmt.Errorf("curl %s: %v: %s", target, err, out)
		}
		return nil
	})
	t.Logf("FIGURE container_first_redirected_request_after=%v (the redirector container started, the route published and synced)", time.Since(start).Round(time.Millisecond))
	// A second request, a new connection: not a lucky one.
	if out, err := cg.Run(t, curl, "-sS", "--max-time", "3", target); err != nil || strings.TrimSpace(string(out)) != "agent-a1" {
		t.Fatalf("second curl in the cgroup: %v: %s", err, out)
	}
	// Outside the cgroup nothing is redirected: 127.77.0.1:9100 has no
	// listener on this host, so the same curl fails.
	if out, err := exec.Command(curl, "-sS", "--max-time", "3", target).CombinedOutput(); err == nil {
		t.Fatalf("curl outside the redirector's cgroup must fail, got %s", out)
	}

	// Each container ran as the manifests say: PS and agent as the image's
	// non-root user with no capability, the redirector as root with exactly
	// redirectorCaps.
	checkProcess(t, ps, nonRootUID, nil)
	checkProcess(t, agent, nonRootUID, nil)
	checkProcess(t, redirector, 0, redirectorCaps)
	if logs := redirector.logs(); !strings.Contains(logs, "installed eBPF programs") || !strings.Contains(logs, cg.Path) {
		t.Fatalf("the redirector's log must say it installed its programs on %s:\n%s", cg.Path, logs)
	}
}

// buildImage runs `make image` with podman's private flags and checks what
// it built: a static binary, the non-root user, the entrypoint, the labels.
func buildImage(t *testing.T, p *podman) string {
	t.Helper()
	makeBin := testutil.RequireBinary(t, "make")
	version := testutil.UniqueName("ctest")
	img := "localhost/tether:" + version
	dir := filepath.Join(p.dir, "image")
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), podmanCommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, makeBin, "-C", repoRoot(t), "image", "VERSION="+version, "IMAGE="+img,
		"IMAGE_DIR="+dir, "PODMAN="+p.buildWrapper(t))
	cmd.Env = append(os.Environ(), p.env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	t.Logf("FIGURE make_image=%v (static build and podman build)", time.Since(start).Round(time.Millisecond))

	checkStatic(t, filepath.Join(dir, "tether"))
	var cfg struct {
		User       string
		Entrypoint []string
		Labels     map[string]string
	}
	if err := json.Unmarshal([]byte(p.must("image", "inspect", "--format", "{{json .Config}}", img)), &cfg); err != nil {
		t.Fatalf("image config: %v", err)
	}
	if cfg.User != fmt.Sprintf("%d:%d", nonRootUID, nonRootUID) || !slices.Equal(cfg.Entrypoint, []string{"/tether"}) {
		t.Fatalf("image config: user %q entrypoint %q, want %d:%d and [/tether]", cfg.User, cfg.Entrypoint, nonRootUID, nonRootUID)
	}
	for _, l := range []string{"title", "source", "version", "revision", "created"} {
		if cfg.Labels["org.opencontainers.image."+l] == "" {
			t.Errorf("image label org.opencontainers.image.%s is missing: %v", l, cfg.Labels)
		}
	}
	if got := cfg.Labels["org.opencontainers.image.version"]; got != version {
		t.Errorf("image label version %q, want %q", got, version)
	}
	// The only layer is the binary: nothing else to patch or scan.
	if layers := p.must("image", "inspect", "--format", "{{len .RootFS.Layers}}", img); layers != "1" {
		t.Errorf("the image has %s layers, want 1 (the binary, FROM scratch)", layers)
	}
	if out := p.must("run", "--rm", "--network", "none", img, "version"); !strings.Contains(out, version) {
		t.Fatalf("tether version in the image: %q, want it to name %s", out, version)
	}
	return img
}

// checkStatic fails unless bin needs no dynamic loader and no shared
// library, which FROM scratch does not have.
func checkStatic(t *testing.T, bin string) {
	t.Helper()
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatalf("the image's binary: %v", err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Fatalf("%s asks for a dynamic loader: it must be built with CGO_ENABLED=0", bin)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Fatalf("%s needs shared libraries %v: it must be static", bin, libs)
	}
}

// redirectorSetup is what every redirector container of the test shares.
type redirectorSetup struct {
	p           *podman
	img         string
	redis       string
	cgroupMount string // the host's cgroup2 mount, bound at the same path
	cgroup      string // the test's cgroup, never the root
	hostTether  string // the image's binary, run on the host to uninstall
}

// args is the redirector's container as the manifests declare it: root
// (the capabilities are the limit), the given capabilities and seccomp
// profile ("" for the runtime's default), the host's bpffs and the cgroup2
// mount read-write.
func (rs redirectorSetup) args(caps []string, seccomp, pinDir string) []string {
	args := append(slices.Clone(sandbox), "--user", "0")
	if len(caps) > 0 {
		args = append(args, "--cap-add", strings.Join(caps, ","))
	}
	if seccomp != "" {
		args = append(args, "--security-opt", seccomp)
	}
	return append(args,
		"-v", "/sys/fs/bpf:/sys/fs/bpf",
		"-v", rs.cgroupMount+":"+rs.cgroupMount+":rw",
		rs.img, "redirector", "--redis", rs.redis, "--cgroup", rs.cgroup, "--pin-dir", pinDir,
		"--target-cidrs", agentCIDR, "--map-size", "10000")
}

// uninstallOnCleanup removes the pins (and so the links) in pinDir when the
// test ends, once the container that made them is gone.
func (rs redirectorSetup) uninstallOnCleanup(t *testing.T, containerName, pinDir string) {
	t.Cleanup(func() {
		_, _ = rs.p.run("rm", "--force", "--time", "0", containerName)
		if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
			return
		}
		if out, err := exec.Command(rs.hostTether, "redirector", "uninstall", "--pin-dir", pinDir).CombinedOutput(); err != nil {
			t.Errorf("redirector uninstall --pin-dir %s: %v\n%s", pinDir, err, out)
		}
	})
}

// start runs the redirector in a detached container with its own pins.
func (rs redirectorSetup) start(t *testing.T, name string, caps []string, seccomp string) *container {
	t.Helper()
	pinDir := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tc"))
	rs.uninstallOnCleanup(t, name, pinDir)
	return rs.p.start(name, rs.args(caps, seccomp, pinDir)...)
}

// mustNotStart runs the redirector with less than it needs and requires it
// to exit with an error before installing anything.
func (rs redirectorSetup) mustNotStart(t *testing.T, what string, caps []string, seccomp string) {
	t.Helper()
	name := testutil.UniqueName("tn")
	pinDir := filepath.Join("/sys/fs/bpf", name)
	rs.uninstallOnCleanup(t, name, pinDir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := rs.p.command(ctx, append([]string{"run", "--rm", "--name", name}, rs.args(caps, seccomp, pinDir)...)...).CombinedOutput()
	switch {
	case ctx.Err() != nil:
		t.Errorf("the redirector %s was still running after 30 s: it must need what was taken away\n%s", what, out)
	case err == nil || strings.Contains(string(out), "installed eBPF programs"):
		t.Errorf("the redirector %s must fail to start: %v\n%s", what, err, out)
	case !refusedForPrivilege(string(out)):
		t.Errorf("the redirector %s failed, but not for want of a privilege: %v\n%s", what, err, out)
	default:
		t.Logf("the redirector %s refuses to start: %s", what, errorLine(string(out)))
	}
}

// checkProcess checks the container's process runs as uid with exactly
// the capabilities caps in its effective set.
func checkProcess(t *testing.T, c *container, uid int, caps []string) {
	t.Helper()
	pid, err := c.pid()
	if err != nil {
		t.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("status of %s: %v", c.name, err)
	}
	var want uint64
	for _, cp := range caps {
		want |= 1 << capBits[cp]
	}
	for _, line := range strings.Split(string(status), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "Uid:":
			if f[1] != strconv.Itoa(uid) {
				t.Errorf("%s runs as uid %s, want %d", c.name, f[1], uid)
			}
		case len(f) >= 2 && f[0] == "CapEff:":
			got, err := strconv.ParseUint(f[1], 16, 64)
			if err != nil || got != want {
				t.Errorf("%s has effective capabilities %s, want %#x (%v)", c.name, f[1], want, caps)
			}
		}
	}
}

// refusedForPrivilege tells a failure for want of a capability (EPERM from
// bpf(), or the verifier rejecting what it allows only to privileged
// loaders) from any other failure, such as a bad flag.
func refusedForPrivilege(out string) bool {
	for _, sign := range []string{"operation not permitted", "permission denied", "prohibited for !root"} {
		if strings.Contains(out, sign) {
			return true
		}
	}
	return false
}

// errorLine is the line of the command's error ("tether: ..."), or the
// last line.
func errorLine(out string) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for _, l := range lines {
		if strings.HasPrefix(l, "tether: ") || strings.HasPrefix(l, "Error: ") {
			return l
		}
	}
	return lines[len(lines)-1]
}

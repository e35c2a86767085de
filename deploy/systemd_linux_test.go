package deploy

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/ps"
)

// roles are the daemons that ship a unit and an example config, by the
// tether subcommand they run.
var roles = []string{"ps", "agent", "redirector", "proxy"}

// unitPath is the unit of a role, relative to this package.
func unitPath(role string) string {
	return filepath.Join("systemd", "tether-"+role+".service")
}

// directive is one "Key=Value" line of a unit file.
type directive struct {
	section, key, value string
	line                int
}

// parseUnit reads the directives of a unit file. It knows what the units
// here use: sections, comments, Key=Value lines; a line continued with a
// trailing backslash is an error, so that a unit that needs one gets a
// parser that handles it.
func parseUnit(data []byte) ([]directive, error) {
	var out []directive
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			continue
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			continue
		case strings.HasSuffix(line, `\`):
			return nil, fmt.Errorf("line %d: continued lines are not supported by this test's parser", n)
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("line %d: %q is neither a section, a comment nor Key=Value", n, line)
		}
		out = append(out, directive{section: section, key: strings.TrimSpace(k), value: strings.TrimSpace(v), line: n})
	}
	return out, sc.Err()
}

// values returns every value given to key in section, in order.
func values(ds []directive, section, key string) []string {
	var out []string
	for _, d := range ds {
		if d.section == section && d.key == key {
			out = append(out, d.value)
		}
	}
	return out
}

// value returns the last value of key in section (systemd's rule for
// single-valued settings), or "".
func value(ds []directive, section, key string) string {
	v := values(ds, section, key)
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// capabilityDefine matches "#define CAP_NET_ADMIN 12" in the kernel's UAPI
// header; CAP_LAST_CAP and the macros are not plain numbers and are skipped.
var capabilityDefine = regexp.MustCompile(`(?m)^#define\s+(CAP_[A-Z_]+)\s+[0-9]+\s*$`)

// linuxCapabilities are the capability names of Linux 6.x, for a machine
// without the kernel headers (CAP_CHECKPOINT_RESTORE, 40, is the last).
var linuxCapabilities = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
	"CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
	"CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
	"CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
	"CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
	"CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
	"CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
}

// knownCapabilities is the kernel's list of capability names: from
// /usr/include/linux/capability.h when it is installed (then the built-in
// list must be part of it, so that the fallback cannot drift), else the
// built-in list.
func knownCapabilities(t *testing.T) map[string]bool {
	t.Helper()
	known := map[string]bool{}
	header, err := os.ReadFile("/usr/include/linux/capability.h")
	if err != nil {
		t.Logf("no kernel capability header (%v): using the built-in list of Linux 6.x names", err)
		for _, c := range linuxCapabilities {
			known[c] = true
		}
		return known
	}
	for _, m := range capabilityDefine.FindAllSubmatch(header, -1) {
		known[string(m[1])] = true
	}
	for _, c := range linuxCapabilities {
		if !known[c] {
			t.Fatalf("built-in capability %s is not in /usr/include/linux/capability.h", c)
		}
	}
	return known
}

// capabilitySet parses the values of a capability setting: space-separated
// names, "~" inverting the list, several lines adding up. It returns the
// names and whether any line was inverted.
func capabilitySet(vals []string) (names []string, inverted bool) {
	for _, v := range vals {
		if strings.HasPrefix(v, "~") {
			inverted = true
			v = v[1:]
		}
		names = append(names, strings.Fields(v)...)
	}
	return names, inverted
}

// checkCapabilities is what systemd-analyze verify does not do: every
// capability name must be one the kernel knows (systemd accepts any name
// and silently drops the unknown), and an ambient capability must be in the
// bounding set, or the process never gets it.
func checkCapabilities(ds []directive, known map[string]bool) error {
	var errs []string
	bounding, boundingInverted := capabilitySet(values(ds, "Service", "CapabilityBoundingSet"))
	ambient, _ := capabilitySet(values(ds, "Service", "AmbientCapabilities"))
	for _, set := range []struct {
		key   string
		names []string
	}{{"CapabilityBoundingSet", bounding}, {"AmbientCapabilities", ambient}} {
		for _, c := range set.names {
			if !known[c] {
				errs = append(errs, fmt.Sprintf("%s: %s is not a Linux capability", set.key, c))
			}
		}
	}
	if boundingInverted {
		errs = append(errs, "CapabilityBoundingSet: a ~ (deny) list grants every capability not named; list the ones granted instead")
	}
	for _, c := range ambient {
		if !slices.Contains(bounding, c) {
			errs = append(errs, fmt.Sprintf("AmbientCapabilities: %s is not in CapabilityBoundingSet, so the process never gets it", c))
		}
	}
	if len(values(ds, "Service", "CapabilityBoundingSet")) == 0 {
		errs = append(errs, "no CapabilityBoundingSet: the service would keep every capability its user has")
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// requireTool returns the path of a program the test needs. When it is
// missing the test skips, except under CI=true or TETHER_TEST_PRIVILEGED=1,
// where a skip would hide that the check never ran: then it fails.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" || os.Getenv(testutil.PrivilegedEnv) == "1" {
		t.Fatalf("%s is not installed (scripts/setup.sh installs it): %v", name, err)
	}
	t.Skipf("skipped: %s is not installed (run scripts/setup.sh)", name)
	return ""
}

// verifyUnit runs systemd-analyze verify on a copy of the unit named name
// (content data) in a temporary directory, with ExecStart's
// /usr/local/bin/tether replaced by bin (verify fails when the binary does
// not exist), and fails on a non-zero exit AND on any output at all:
// verify only warns, exiting 0, on an unknown key or section.
func verifyUnit(t *testing.T, analyze, bin, name string, data []byte) error {
	t.Helper()
	dir := t.TempDir()
	copyPath := filepath.Join(dir, name)
	data = bytes.ReplaceAll(data, []byte("/usr/local/bin/tether"), []byte(bin))
	if err := os.WriteFile(copyPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(analyze, "verify", "--man=no", copyPath)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
	}
	if len(bytes.TrimSpace(out)) > 0 {
		return fmt.Errorf("systemd-analyze verify %s printed warnings (treated as errors):\n%s", name, out)
	}
	return nil
}

// checkUnit is every check a unit must pass: systemd-analyze verify without
// a word, and capability names the kernel knows.
func checkUnit(t *testing.T, analyze, bin, name string, data []byte, known map[string]bool) error {
	t.Helper()
	ds, err := parseUnit(data)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := verifyUnit(t, analyze, bin, name, data); err != nil {
		return err
	}
	if err := checkCapabilities(ds, known); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// fakeTether is an executable that stands in for /usr/local/bin/tether:
// systemd-analyze verify checks only that ExecStart's program exists and is
// executable. TestRedirectorRunsWithExactlyItsUnitCapabilities runs the
// real binary.
func fakeTether(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tether")
	if err := os.WriteFile(p, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestUnitsPassSystemdAnalyzeVerifyWithoutWarnings(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze")
	known := knownCapabilities(t)
	bin := fakeTether(t)
	for _, role := range roles {
		t.Run(role, func(t *testing.T) {
			data, err := os.ReadFile(unitPath(role))
			if err != nil {
				t.Fatal(err)
			}
			if err := checkUnit(t, analyze, bin, filepath.Base(unitPath(role)), data, known); err != nil {
				t.Error(err)
			}
		})
	}
}

// The checks catch what systemd-analyze verify lets through with exit 0: an
// unknown key (a warning only), and a misspelt capability (accepted and
// silently dropped).
func TestUnitCheckFailsOnUnknownKeyAndMisspeltCapability(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze")
	known := knownCapabilities(t)
	bin := fakeTether(t)
	good, err := os.ReadFile(unitPath("ps"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, from, to, want string
	}{
		{"unknown key", "KillSignal=SIGTERM", "KillSignal=SIGTERM\nRestartSecs=2s", "Unknown key"},
		{"key in the wrong section", "KillSignal=SIGTERM", "KillSignal=SIGTERM\nStartLimitIntervalSec=60s", "Unknown key"},
		{"misspelt capability", "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN\n", "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMN\n", "CAP_NET_ADMN is not a Linux capability"},
		{"ambient outside the bounding set", "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n", "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n", "not in CapabilityBoundingSet"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := bytes.Replace(good, []byte(tc.from), []byte(tc.to), 1)
			if bytes.Equal(bad, good) {
				t.Fatalf("tether-ps.service has no %q to replace", tc.from)
			}
			err := checkUnit(t, analyze, bin, "tether-ps.service", bad, known)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("check of a unit with a %s: got %v, want an error containing %q", tc.name, err, tc.want)
			}
		})
	}
}

// Each unit runs its own role with its own config and env file, restarts,
// stops with SIGTERM and waits longer than the role's drain, is hardened,
// and, but for the redirector, runs as the unprivileged tether user.
func TestUnitsFollowTheDeploymentPolicy(t *testing.T) {
	drain := map[string]time.Duration{
		"ps":    max(ps.DefaultConfig().DrainTimeout, exampleDuration(t, "ps", "drain-timeout")),
		"agent": max(agent.DefaultConfig().DrainTimeout, exampleDuration(t, "agent", "drain-timeout")),
	}
	for _, role := range roles {
		t.Run(role, func(t *testing.T) {
			data, err := os.ReadFile(unitPath(role))
			if err != nil {
				t.Fatal(err)
			}
			ds, err := parseUnit(data)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{
				"ExecStart":               "/usr/local/bin/tether " + role + " --config /etc/tether/" + role + ".yaml",
				"EnvironmentFile":         "-/etc/tether/" + role + ".env",
				"KillSignal":              "SIGTERM",
				"NoNewPrivileges":         "yes",
				"ProtectSystem":           "strict",
				"ProtectHome":             "yes",
				"PrivateTmp":              "yes",
				"ProtectKernelTunables":   "yes",
				"ProtectKernelModules":    "yes",
				"ProtectControlGroups":    "yes",
				"SystemCallArchitectures": "native",
			}
			if role == "redirector" {
				want["ReadWritePaths"] = "/sys/fs/bpf"
			} else {
				want["User"] = "tether"
			}
			if role == "ps" {
				want["LimitNOFILE"] = "65536"
			}
			for k, v := range want {
				if got := value(ds, "Service", k); got != v {
					t.Errorf("%s=%q, want %q", k, got, v)
				}
			}
			if role == "redirector" && value(ds, "Service", "User") != "" {
				t.Errorf("the redirector runs as uid 0 with a bounded capability set (it owns the pins), not User=%s", value(ds, "Service", "User"))
			}
			if r := value(ds, "Service", "Restart"); r != "on-failure" && r != "always" {
				t.Errorf("Restart=%q, want on-failure or always", r)
			}
			if value(ds, "Service", "RestartSec") == "" {
				t.Error("no RestartSec")
			}
			if value(ds, "Service", "RestrictAddressFamilies") == "" {
				t.Error("no RestrictAddressFamilies")
			}
			stop, err := time.ParseDuration(value(ds, "Service", "TimeoutStopSec"))
			if err != nil {
				t.Fatalf("TimeoutStopSec=%q: want a duration such as 30s: %v", value(ds, "Service", "TimeoutStopSec"), err)
			}
			if d, ok := drain[role]; ok && stop <= d {
				t.Errorf("TimeoutStopSec=%v does not exceed the drain (%v): systemd would SIGKILL a draining %s", stop, d, role)
			}
			if _, err := os.Stat(filepath.Join("config", role+".yaml")); err != nil {
				t.Errorf("the unit reads /etc/tether/%s.yaml but deploy/config has no example of it: %v", role, err)
			}
		})
	}
}

// exampleDuration reads one duration key of an example config.
func exampleDuration(t *testing.T, role, key string) time.Duration {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("config", role+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatalf("config/%s.yaml: %v", role, err)
	}
	s, _ := m[key].(string)
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("config/%s.yaml %s: %v", role, key, err)
	}
	return d
}

// The sysusers.d file creates the user the units run as.
func TestSysusersCreatesTheServiceUser(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("systemd", "tether.sysusers.conf"))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "u" && f[1] == "tether" {
			found = true
		}
	}
	if !found {
		t.Fatal(`tether.sysusers.conf has no "u tether ..." line: User=tether would not exist`)
	}
}

// syscallGroups expands systemd's system call groups (@system-service,
// @privileged, ...) into system call names with systemd-analyze
// syscall-filter, nested groups included: the groups are systemd's, and
// change between its versions.
type syscallGroups struct {
	analyze string
	cache   map[string]map[string]bool
}

func (g *syscallGroups) expand(name string) (map[string]bool, error) {
	if !strings.HasPrefix(name, "@") {
		return map[string]bool{name: true}, nil
	}
	if set, ok := g.cache[name]; ok {
		return set, nil
	}
	out, err := exec.Command(g.analyze, "syscall-filter", "--no-pager", name).Output()
	if err != nil {
		return nil, fmt.Errorf("systemd-analyze syscall-filter %s: %w", name, err)
	}
	lines := strings.Split(string(out), "\n")
	if strings.TrimSpace(lines[0]) != name {
		return nil, fmt.Errorf("systemd-analyze syscall-filter %s: no such group (got %q)", name, lines[0])
	}
	set := map[string]bool{}
	for _, l := range lines[1:] {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		sub, err := g.expand(l)
		if err != nil {
			return nil, err
		}
		for c := range sub {
			set[c] = true
		}
	}
	if g.cache == nil {
		g.cache = map[string]map[string]bool{}
	}
	g.cache[name] = set
	return set, nil
}

// syscallFilterAllows evaluates a unit's SystemCallFilter= lines as systemd
// does: the first line makes the filter an allow list, or with "~" a deny
// list; each later line of the same kind adds its calls to the list, each
// line of the other kind removes them. So the order matters: an allow list
// that names bpf and then denies @privileged denies bpf.
func syscallFilterAllows(g *syscallGroups, lines []string, call string) (bool, error) {
	if len(lines) == 0 {
		return true, nil
	}
	allowList := !strings.HasPrefix(lines[0], "~")
	listed := map[string]bool{}
	for _, l := range lines {
		deny := strings.HasPrefix(l, "~")
		fields := strings.Fields(strings.TrimPrefix(l, "~"))
		if len(fields) == 0 {
			return false, fmt.Errorf("SystemCallFilter=%q resets the filter: this check does not model that", l)
		}
		for _, name := range fields {
			name, _, _ = strings.Cut(name, ":") // a ":errno" suffix
			calls, err := g.expand(name)
			if err != nil {
				return false, err
			}
			for c := range calls {
				if deny != allowList { // a line of the list's own kind
					listed[c] = true
				} else {
					delete(listed, c)
				}
			}
		}
	}
	return listed[call] == allowList, nil
}

// bpf(2) is allowed to exactly the units that load BPF programs: the PS
// (the sk_lookup data plane) and the redirector. systemd-analyze verify
// says nothing about a filter that denies what the capabilities grant: the
// PS would hold CAP_BPF and get EPERM from seccomp (and auto would fall
// back to listeners without anyone asking for it).
func TestSystemCallFilterAllowsBPFExactlyWhereNeeded(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze")
	g := &syscallGroups{analyze: analyze}

	// The evaluator itself, on the PS's filter before and after issue 12:
	// bpf listed first and then @privileged denied is no bpf at all.
	for _, tc := range []struct {
		lines []string
		want  bool
	}{
		{[]string{"@system-service", "~@privileged @resources"}, false},
		{[]string{"@system-service bpf", "~@privileged @resources"}, false},
		{[]string{"@system-service", "~@privileged @resources", "bpf"}, true},
		{[]string{"~@privileged", "bpf"}, true},
	} {
		got, err := syscallFilterAllows(g, tc.lines, "bpf")
		if err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("SystemCallFilter %q allows bpf: got %v, want %v", tc.lines, got, tc.want)
		}
	}

	needsBPF := map[string]bool{"ps": true, "redirector": true}
	for _, role := range roles {
		data, err := os.ReadFile(unitPath(role))
		if err != nil {
			t.Fatal(err)
		}
		ds, err := parseUnit(data)
		if err != nil {
			t.Fatal(err)
		}
		filter := values(ds, "Service", "SystemCallFilter")
		allows, err := syscallFilterAllows(g, filter, "bpf")
		if err != nil {
			t.Fatalf("%s: %v", unitPath(role), err)
		}
		switch {
		case needsBPF[role] && !allows:
			t.Errorf("%s: SystemCallFilter %q denies bpf(2), which it needs", unitPath(role), filter)
		case !needsBPF[role] && allows:
			t.Errorf("%s: SystemCallFilter %q allows bpf(2), which it has no use for", unitPath(role), filter)
		}
	}
}

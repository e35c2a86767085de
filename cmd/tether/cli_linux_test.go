package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
)

// writeConfig writes a config file in the test's temporary directory.
func writeConfig(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// sharedConfig is one file for a host that runs a PS and a redirector: the
// registry settings both read, then each one's own.
func sharedConfig(t *testing.T, redisAddr, listen, extra string) string {
	return writeConfig(t, "tether.yaml", fmt.Sprintf(`# shared by "tether ps" and "tether redirector"
redis: %s          # host:port, no redis:// needed
redis-prefix: shared1

# ps
id: ps1
listen: %s
advertise: 127.0.0.1
ports: %s
token-file: %s
agent-cidrs: [%s]
lease: 2s
renew: 500ms
drain-timeout: 1s

# redirector
cgroup: /sys/fs/cgroup/unified/tether-cli-test-does-not-exist
pin-dir: /sys/fs/bpf/tether-cli-test-does-not-exist
target-cidrs: [127.77.0.0/16]
suspect-hold: 1s
%s`, redisAddr, listen, tunneltest.FreeRange(t, 10),
		tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n"), tunneltest.AgentRange, extra))
}

// One file carries the settings of the PS and the redirector: each command
// reads its own keys, ignores the other's, and still refuses a typo.
func TestOneConfigFileServesPSAndRedirector(t *testing.T) {
	rd := testutil.StartRedis(t)
	listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	cfgPath := sharedConfig(t, rd.Addr(), listen, "")

	// The PS runs from it: it listens where the file says, and publishes
	// its lease under the file's --redis-prefix at the host:port address.
	ctx, cancel := context.WithCancel(context.Background())
	var log testutil.SyncBuffer
	done := make(chan error, 1)
	go func() {
		root := newRootCmd()
		root.SetOut(&log)
		root.SetErr(&log)
		root.SetArgs([]string{"--config", cfgPath, "ps"})
		done <- root.ExecuteContext(ctx)
	}()
	stopped := false
	stopPS := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(15 * time.Second):
			return fmt.Errorf("ps did not stop")
		}
	}
	t.Cleanup(func() { _ = stopPS() })

	// The registry as the file's prefix and as the default one.
	shared, err := registry.New(registry.Config{URL: rd.URL(), Prefix: "shared1"})
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Close()
	deflt := tunneltest.NewRegistry(t, rd.URL())
	testutil.Eventually(t, 10*time.Second, "the PS lease under the prefix from the shared file", func() error {
		select {
		case err := <-done:
			stopped = true
			return fmt.Errorf("ps exited: %v\n%s", err, log.String()) // Eventually retries; the log shows why
		default:
		}
		leases, err := shared.PSLeases(context.Background())
		if _, ok := leases["ps1"]; err != nil || len(leases) != 1 || !ok {
			return fmt.Errorf("leases under the prefix shared1: %+v, %v", leases, err)
		}
		return nil
	})
	testutil.WaitTCP(t, listen, 10*time.Second) // the listen address from the file
	if leases, err := deflt.PSLeases(context.Background()); err != nil || len(leases) > 0 {
		t.Errorf("the PS wrote under the default prefix despite redis-prefix in the file: %+v, %v", leases, err)
	}
	if err := stopPS(); err != nil {
		t.Errorf("ps: %v\n%s", err, log.String())
	}

	// The redirector reads the same file: past the config (the PS keys
	// are ignored), it fails only on the file's cgroup, which does not
	// exist. It gets no further, so nothing is attached anywhere.
	out, err := runTether(t, "--config", cfgPath, "redirector")
	if err == nil || !strings.Contains(err.Error(), "tether-cli-test-does-not-exist") {
		t.Fatalf("redirector with the shared file: want the cgroup from the file refused, got %v\n%s", err, out)
	}
	if strings.Contains(err.Error(), "unknown key") {
		t.Fatalf("redirector refused a PS key of the shared file: %v", err)
	}
	// uninstall reads pin-dir from it as well (and would check its cgroup:
	// the flag, which wins over the file, turns that check off).
	_, err = runTether(t, "--config", cfgPath, "redirector", "uninstall", "--cgroup", "")
	if err == nil || !strings.Contains(err.Error(), "pin directory /sys/fs/bpf/tether-cli-test-does-not-exist does not exist") {
		t.Fatalf("uninstall with the shared file: want its pin-dir named, got %v", err)
	}

	// Negative: a typo in the shared file stops both, naming the key, the
	// file and the line, with the nearest key.
	typo := sharedConfig(t, rd.Addr(), listen, "advertize: 127.0.0.2\n")
	line := strings.Count(strings.Split(mustRead(t, typo), "advertize:")[0], "\n") + 1
	for _, args := range [][]string{{"ps"}, {"redirector"}, {"redirector", "status"}} {
		_, err := runTether(t, append([]string{"--config", typo}, args...)...)
		want := fmt.Sprintf(`unknown key "advertize" in %s (line %d): did you mean "advertise"`, typo, line)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("tether %s: got %v, want %q", strings.Join(args, " "), err, want)
		}
	}
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestConfigTypoSuggestsTheNearestKey(t *testing.T) {
	p := writeConfig(t, "ps.yaml", "id: ps1\nadvertize: 127.0.0.1\n")
	_, err := runTether(t, "--config", p, "ps")
	want := fmt.Sprintf(`unknown key "advertize" in %s (line 2): did you mean "advertise"?`, p)
	if err == nil || err.Error() != want {
		t.Fatalf("got  %v\nwant %s", err, want)
	}
}

func TestConfigErrorsNameKeysNotGoTypes(t *testing.T) {
	p := writeConfig(t, "agent.yaml", "server: [127.0.0.1:7000]\nid: a1\ntunnels: two\nexpose: 80\n")
	_, err := runTether(t, "--config", p, "agent")
	if err == nil {
		t.Fatal("tunnels: two was accepted")
	}
	want := fmt.Sprintf(`key "tunnels" in %s (line 3): "two" is not a whole number`, p)
	if err.Error() != want {
		t.Errorf("got  %v\nwant %s", err, want)
	}
	// What the old decoder said: a Go type and a struct name.
	for _, goism := range []string{"main.", "agent.Config", "unmarshal", "!!str"} {
		if strings.Contains(err.Error(), goism) {
			t.Errorf("error mentions %q: %v", goism, err)
		}
	}
}

func TestRedisFlagTakesHostPortOrSaysWhatItWants(t *testing.T) {
	rd := testutil.StartRedis(t)
	// host:port reaches the registry (an empty one: no routes, no error).
	out, err := runTether(t, "routes", "list", "--redis", rd.Addr())
	if err != nil {
		t.Fatalf("routes list --redis %s: %v\n%s", rd.Addr(), err, out)
	}
	if !strings.HasPrefix(out, "TARGET") {
		t.Errorf("routes list printed %q, want the table header", out)
	}
	// A bare name is not an address: one line saying what is expected.
	_, err = runTether(t, "routes", "list", "--redis", "localhost")
	if err == nil || !strings.Contains(err.Error(), "want host:port, redis://") || strings.Contains(err.Error(), "\n") {
		t.Errorf("--redis localhost: got %v, want one line listing the accepted forms", err)
	}
	// The PS says the same before it starts anything.
	_, err = runTether(t, "ps", "--id", "ps1", "--advertise", "127.0.0.1", "--insecure",
		"--listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)), "--redis", "http://127.0.0.1:6379")
	if err == nil || !strings.Contains(err.Error(), `scheme "http" is not redis, rediss or unix`) {
		t.Errorf("ps --redis http://...: got %v", err)
	}
}

func TestEveryRegistryReaderHasRedisPrefix(t *testing.T) {
	for _, args := range [][]string{{"ps"}, {"proxy"}, {"redirector"}, {"routes", "list"}, {"routes", "get"}} {
		out, err := runTether(t, append(args, "--help")...)
		if err != nil {
			t.Fatalf("%v --help: %v", args, err)
		}
		if !strings.Contains(out, "--redis-prefix") {
			t.Errorf("tether %s has no --redis-prefix", strings.Join(args, " "))
		}
	}
}

func TestUninstallRefusesAMissingOrForeignPinDir(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "does", "not", "exist")
	out, err := runTether(t, "redirector", "uninstall", "--pin-dir", missing)
	if err == nil || !strings.Contains(err.Error(), "pin directory "+missing+" does not exist") {
		t.Errorf("uninstall of a missing pin dir: got %v (%q), want an error naming it", err, out)
	}
	if strings.Contains(out, "uninstalled") {
		t.Errorf("uninstall of a missing pin dir reported success: %q", out)
	}

	// A directory holding anything tether did not pin is not removed.
	foreign := t.TempDir()
	keep := filepath.Join(foreign, "precious.txt")
	if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = runTether(t, "redirector", "uninstall", "--pin-dir", foreign)
	if err == nil || !strings.Contains(err.Error(), `holds "precious.txt"`) {
		t.Errorf("uninstall of a foreign directory: got %v, want a refusal naming precious.txt", err)
	}
	if _, statErr := os.Stat(keep); statErr != nil {
		t.Errorf("uninstall removed a file it did not pin: %v", statErr)
	}

	// An empty leftover pin directory is removed, and that is a success.
	empty := filepath.Join(t.TempDir(), "tether")
	if err := os.Mkdir(empty, 0o700); err != nil {
		t.Fatal(err)
	}
	out, err = runTether(t, "redirector", "uninstall", "--pin-dir", empty)
	if err != nil || !strings.Contains(out, "uninstalled") {
		t.Errorf("uninstall of an empty pin dir: %v %q", err, out)
	}
	if _, statErr := os.Stat(empty); !os.IsNotExist(statErr) {
		t.Errorf("empty pin dir still there: %v", statErr)
	}
}

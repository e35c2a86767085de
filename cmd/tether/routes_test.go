package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/registry"
)

// runTether runs the tether command tree in-process with args.
func runTether(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	root := newRootCmd()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestRoutesListAndGetShowLiveBackends(t *testing.T) {
	rd := testutil.StartRedis(t)
	ctx := context.Background()
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	until := time.Now().Add(time.Minute)
	_ = reg.RenewPS(ctx, registry.PSLease{ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: until})
	_ = reg.RenewPS(ctx, registry.PSLease{ID: "ps2", Addr: netip.MustParseAddr("127.0.0.2"), State: registry.PSActive, ExpiresAt: until})
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	for ps, port := range map[string]uint16{"ps1": 20001, "ps2": 30001} {
		if _, err := reg.Publish(ctx, ps, []registry.Publication{{Target: target, Port: port, AgentID: "a1"}}); err != nil {
			t.Fatal(err)
		}
	}

	out, err := runTether(t, "routes", "get", "127.77.0.1:9100", "--redis", rd.URL(), "-o", "json")
	if err != nil {
		t.Fatalf("routes get: %v\n%s", err, out)
	}
	var got struct {
		Target   string `json:"target"`
		Backends []struct {
			PSID      string `json:"ps_id"`
			Address   string `json:"address"`
			AgentID   string `json:"agent_id"`
			ExpiresAt string `json:"expires_at"`
		} `json:"backends"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("routes get -o json is not JSON: %v\n%s", err, out)
	}
	if got.Target != "127.77.0.1:9100" || len(got.Backends) != 2 || got.Backends[0].Address != "127.0.0.1:20001" ||
		got.Backends[1].PSID != "ps2" || got.Backends[0].AgentID != "a1" {
		t.Fatalf("unexpected route: %+v", got)
	}
	if _, err := time.Parse(time.RFC3339, got.Backends[0].ExpiresAt); err != nil {
		t.Fatalf("expires_at is not RFC 3339: %v", err)
	}

	out, err = runTether(t, "routes", "list", "--redis", rd.URL(), "-o", "json")
	if err != nil || !strings.HasPrefix(strings.TrimSpace(out), "[") || !strings.Contains(out, `"ps_id": "ps2"`) {
		t.Fatalf("routes list -o json: %v\n%s", err, out)
	}
	out, err = runTether(t, "routes", "list", "--redis", rd.URL())
	if err != nil || !strings.Contains(out, "TARGET") || !strings.Contains(out, "127.0.0.2:30001") {
		t.Fatalf("routes list table: %v\n%s", err, out)
	}

	if _, err := runTether(t, "routes", "get", "127.77.0.9:1", "--redis", rd.URL()); err == nil || !strings.Contains(err.Error(), "no live route") {
		t.Fatalf("unknown target: want 'no live route', got %v", err)
	}
	if _, err := runTether(t, "routes", "get", "bogus", "--redis", rd.URL()); err == nil || !strings.Contains(err.Error(), "IP:PORT") {
		t.Fatalf("bad target: want a clear error, got %v", err)
	}
	if _, err := runTether(t, "routes", "list", "--redis", rd.URL(), "-o", "yaml"); err == nil || !strings.Contains(err.Error(), "table or json") {
		t.Fatalf("bad output: want a clear error, got %v", err)
	}
}

func TestEveryCommandHasHelp(t *testing.T) {
	var paths [][]string
	var visit func(prefix []string, c *cobra.Command)
	visit = func(prefix []string, c *cobra.Command) {
		for _, sc := range c.Commands() {
			p := append(append([]string{}, prefix...), sc.Name())
			paths = append(paths, p)
			visit(p, sc)
		}
	}
	visit(nil, newRootCmd())
	for _, p := range paths {
		out, err := runTether(t, append(p, "--help")...)
		if err != nil || !strings.Contains(out, "Usage:") {
			t.Errorf("tether %s --help: %v\n%s", strings.Join(p, " "), err, out)
		}
	}
}

func TestFlagsComeFromAYAMLFileToo(t *testing.T) {
	rd := testutil.StartRedis(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "routes.yaml")
	if err := os.WriteFile(good, []byte("redis: "+rd.URL()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runTether(t, "routes", "list", "--config", good); err != nil || !strings.Contains(out, "TARGET") {
		t.Fatalf("routes list with the Redis URL from a file: %v\n%s", err, out)
	}
	bad := filepath.Join(dir, "proxy.yaml")
	if err := os.WriteFile(bad, []byte("redis: "+rd.URL()+"\nsocks: 127.0.0.1:0\nsockss: typo\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := runTether(t, "proxy", "--config", bad)
	if err == nil || !strings.Contains(err.Error(), "proxy.yaml") || !strings.Contains(err.Error(), "sockss") {
		t.Fatalf("an unknown key must be an error naming the file and the key, got %v", err)
	}
}

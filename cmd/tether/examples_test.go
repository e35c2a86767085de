package main

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/proxy"
	"github.com/tether-net/tether/ps"
	"github.com/tether-net/tether/redirector"
)

// exampleRole is a daemon whose example config lives in deploy/config.
type exampleRole struct {
	name string
	// config returns a fresh default config and its metrics address field,
	// as the command builds them.
	config func() (validator, *string)
	// leftOut are the config keys the example deliberately does not set,
	// each with the reason.
	leftOut map[string]string
}

var exampleRoles = []exampleRole{
	{name: "ps", config: func() (validator, *string) { c := ps.DefaultConfig(); return &c, &c.Metrics },
		leftOut: map[string]string{"insecure": "for experiments only; production sets credentials"}},
	{name: "agent", config: func() (validator, *string) { c := agent.DefaultConfig(); return &c, &c.Metrics }},
	{name: "redirector", config: func() (validator, *string) { c := redirector.DefaultConfig(); return &c, &c.Metrics }},
	{name: "proxy", config: func() (validator, *string) { c := proxy.DefaultConfig(); return &c, &c.Metrics }},
}

// errConfigLoaded stops runDaemon right after the config was resolved,
// validated and the logger built: where the daemon itself would be created.
var errConfigLoaded = errors.New("config loaded")

// loadExample runs the daemon command's own path for `tether ROLE --config
// PATH` (runDaemon: resolve defaults, file, environment and flags, then
// validate) and stops before the daemon starts.
func loadExample(t *testing.T, role exampleRole, path string) (validator, error) {
	t.Helper()
	cmd := findCommand(t, role.name)
	// The daemon's log (its start line) goes to the test log, not stderr.
	var logs strings.Builder
	cmd.SetErr(&logs)
	defer func() { t.Logf("tether %s --config %s logged:\n%s", role.name, path, logs.String()) }()
	cfg, metrics := role.config()
	g := &globalFlags{logLevel: "info", logFormat: "text", config: path}
	err := runDaemon(cmd, g, cfg, metrics, func(*slog.Logger, *prometheus.Registry) (runner, error) {
		return nil, errConfigLoaded
	})
	if errors.Is(err, errConfigLoaded) {
		return cfg, nil
	}
	if err == nil {
		t.Fatalf("runDaemon returned nil without building the %s daemon", role.name)
	}
	return nil, err
}

// findCommand returns the subcommand of a fresh root command.
func findCommand(t *testing.T, name string) *cobra.Command {
	t.Helper()
	cmd, _, err := newRootCmd().Find([]string{name})
	if err != nil || cmd.Name() != name {
		t.Fatalf("tether has no %s command: %v", name, err)
	}
	return cmd
}

// configKeys are the keys a role's config file may carry: its flags.
func configKeys(role exampleRole) []string {
	cfg, _ := role.config()
	fs := pflag.NewFlagSet(role.name, pflag.ContinueOnError)
	cliconfig.Bind(fs, cfg)
	var keys []string
	fs.VisitAll(func(f *pflag.Flag) { keys = append(keys, f.Name) })
	return keys
}

// fileKeys are the top-level keys of a YAML file.
func fileKeys(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func examplePath(role string) string {
	return filepath.Join("..", "..", "deploy", "config", role+".yaml")
}

// Every example config loads and validates through the command's own code
// path, sets only keys of its own command (a key another command owns would
// be ignored, not used), and sets every key of its command but the ones left
// out on purpose: a renamed, removed or added flag fails here until the
// example follows.
func TestExampleConfigsLoadThroughTheirCommand(t *testing.T) {
	for _, role := range exampleRoles {
		t.Run(role.name, func(t *testing.T) {
			path := examplePath(role.name)
			if _, err := loadExample(t, role, path); err != nil {
				t.Fatalf("tether %s --config %s: %v", role.name, path, err)
			}
			own := configKeys(role)
			keys := fileKeys(t, path)
			for _, k := range keys {
				if !slices.Contains(own, k) {
					t.Errorf("%s sets %q, which is not a flag of tether %s", path, k, role.name)
				}
				if why, ok := role.leftOut[k]; ok {
					t.Errorf("%s sets %q, listed as left out on purpose (%s)", path, k, why)
				}
			}
			for _, k := range own {
				if _, ok := role.leftOut[k]; !ok && !slices.Contains(keys, k) {
					t.Errorf("%s does not set %q (tether %s --%s): add it, commented, or list it as left out on purpose", path, k, role.name, k)
				}
			}
		})
	}
}

// The test can fail: a misspelt key, a value of the wrong type, and a
// config that does not validate are each refused, with the key named.
func TestExampleConfigLoadFailsOnABrokenCopy(t *testing.T) {
	role := exampleRoles[0] // ps
	good, err := os.ReadFile(examplePath(role.name))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, from, to, want string
	}{
		{"misspelt key", "\ndrain-timeout:", "\ndrain-timout:", "drain-timout"},
		{"wrong type", "\nmax-conns: 65536", "\nmax-conns: many", "many"},
		{"invalid value", "\nintent: verify", "\nintent: sometimes", "sometimes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := strings.Replace(string(good), tc.from, tc.to, 1)
			if bad == string(good) {
				t.Fatalf("%s has no %q to replace", examplePath(role.name), tc.from)
			}
			path := filepath.Join(t.TempDir(), "ps.yaml")
			if err := os.WriteFile(path, []byte(bad), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := loadExample(t, role, path)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("loading a copy with a %s: got %v, want an error naming %q", tc.name, err, tc.want)
			}
		})
	}
}

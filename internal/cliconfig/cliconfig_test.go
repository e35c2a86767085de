package cliconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

type testConfig struct {
	Listen  string        `yaml:"listen" flag:"listen" usage:"listen address"`
	Lease   time.Duration `yaml:"lease" flag:"lease" usage:"lease"`
	Expose  []string      `yaml:"expose" flag:"expose" usage:"endpoints"`
	Tunnels int           `yaml:"tunnels" flag:"tunnels" usage:"tunnels"`
	Nested  struct {
		Depth int `yaml:"depth"`
	} `yaml:"nested"`
}

func defaults() testConfig {
	return testConfig{Listen: ":7000", Lease: 15 * time.Second, Tunnels: 2}
}

func resolve(t *testing.T, args []string, file string, env map[string]string) (testConfig, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	cfg := defaults()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	Bind(fs, &cfg)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse: %v", err)
	}
	path := ""
	if file != "" {
		path = filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(path, []byte(file), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	err := Resolve(fs, path, &cfg)
	return cfg, err
}

func TestPrecedenceIsDefaultsThenFileThenEnvThenFlags(t *testing.T) {
	cfg, err := resolve(t,
		[]string{"--tunnels", "3"},
		"listen: 127.0.0.1:1\nlease: 30s\ntunnels: 5\nexpose: [\"80\", \"443\"]\nnested:\n  depth: 4\n",
		map[string]string{"TETHER_LISTEN": "127.0.0.1:2", "TETHER_TUNNELS": "9"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:2" {
		t.Errorf("env should beat file: listen = %q", cfg.Listen)
	}
	if cfg.Tunnels != 3 {
		t.Errorf("flag should beat env and file: tunnels = %d", cfg.Tunnels)
	}
	if cfg.Lease != 30*time.Second {
		t.Errorf("file should beat default: lease = %v", cfg.Lease)
	}
	if strings.Join(cfg.Expose, ",") != "80,443" || cfg.Nested.Depth != 4 {
		t.Errorf("file values lost: %+v", cfg)
	}
}

func TestDefaultsSurviveWithoutFileOrFlags(t *testing.T) {
	cfg, err := resolve(t, nil, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != ":7000" || cfg.Lease != 15*time.Second || cfg.Tunnels != 2 {
		t.Errorf("defaults changed: %+v", cfg)
	}
}

func TestUnknownFieldInFileIsAnErrorNamingFileAndField(t *testing.T) {
	_, err := resolve(t, nil, "listen: x\nlistne: y\n", nil)
	if err == nil || !strings.Contains(err.Error(), "c.yaml") || !strings.Contains(err.Error(), "listne") {
		t.Fatalf("want an error naming the file and the field, got %v", err)
	}
}

func TestBadEnvValueIsNamed(t *testing.T) {
	_, err := resolve(t, nil, "", map[string]string{"TETHER_LEASE": "soon"})
	if err == nil || !strings.Contains(err.Error(), "TETHER_LEASE") {
		t.Fatalf("want an error naming TETHER_LEASE, got %v", err)
	}
}

func TestEmptyFileIsValid(t *testing.T) {
	if _, err := resolve(t, nil, "# nothing\n", nil); err != nil {
		t.Fatal(err)
	}
}

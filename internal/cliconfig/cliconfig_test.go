package cliconfig

import (
	"errors"
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

// otherCommandConfig stands for another command of the same program: once
// bound, its keys may appear in a file testConfig reads.
type otherCommandConfig struct {
	Cgroup string `yaml:"cgroup" flag:"cgroup" usage:"cgroup"`
	PinDir string `yaml:"pin-dir" flag:"pin-dir" usage:"pins"`
}

func bindOtherCommand() {
	var other otherCommandConfig
	Bind(pflag.NewFlagSet("other", pflag.ContinueOnError), &other)
}

func TestKeysOfAnotherBoundCommandAreIgnored(t *testing.T) {
	bindOtherCommand()
	cfg, err := resolve(t, nil, "listen: 127.0.0.1:1\ncgroup: /sys/fs/cgroup/unified/x\npin-dir: /sys/fs/bpf/t\n", nil)
	if err != nil {
		t.Fatalf("a key of another command must be ignored: %v", err)
	}
	if cfg.Listen != "127.0.0.1:1" {
		t.Errorf("own key lost beside another command's keys: listen = %q", cfg.Listen)
	}
	// ...but a key no command has is still an error, even beside them.
	_, err = resolve(t, nil, "cgroup: /x\nwhatever-this-is: 1\n", nil)
	var fe *FileError
	if !errors.As(err, &fe) || !fe.Unknown || fe.Key != "whatever-this-is" || fe.Line != 2 {
		t.Fatalf("want an unknown-key error for whatever-this-is on line 2, got %v", err)
	}
	if strings.Contains(err.Error(), "cliconfig.") || strings.Contains(err.Error(), "type ") {
		t.Errorf("error names a Go type: %v", err)
	}
}

func TestTypoSuggestsTheNearestKey(t *testing.T) {
	bindOtherCommand()
	for _, tc := range []struct{ file, key, want string }{
		{"lisen: x\n", "lisen", `did you mean "listen"?`},      // deletion
		{"laese: 1s\n", "laese", `did you mean "lease"?`},      // transposition
		{"Tunnels: 2\n", "Tunnels", `did you mean "tunnels"?`}, // case
		{"nested:\n  dpth: 1\n", "nested.dpth", `did you mean "nested.depth"?`},
		// Not this command's key, but near another command's.
		{"cgroupp: /x\n", "cgroupp", `did you mean "cgroup" (a setting of another tether command)?`},
		// Far from everything: no suggestion.
		{"zzzzzzzz: 1\n", "zzzzzzzz", "no tether command has this setting"},
	} {
		_, err := resolve(t, nil, tc.file, nil)
		if err == nil {
			t.Errorf("%q: no error", tc.file)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, `unknown key "`+tc.key+`" in `) || !strings.Contains(msg, "c.yaml") || !strings.Contains(msg, tc.want) {
			t.Errorf("%q: got %q, want the key %q, the file and %q", tc.file, msg, tc.key, tc.want)
		}
	}
}

func TestSuggestExactMessage(t *testing.T) {
	e := &FileError{Path: "ps.yaml", Line: 3, Key: "advertize", Unknown: true, Suggestion: suggest("advertize", []string{"id", "advertise", "listen"})}
	if got, want := e.Error(), `unknown key "advertize" in ps.yaml (line 3): did you mean "advertise"?`; got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestBadValuesNameKeyFileAndLineNotGoTypes(t *testing.T) {
	_, err := resolve(t, nil, "listen: ok\nlease: soon\ntunnels: many\nexpose: {a: b}\nlisten: again\n", nil)
	if err == nil {
		t.Fatal("no error")
	}
	msg := err.Error()
	for _, want := range []string{
		`key "lease" in ` + "", `(line 2): "soon" is not a duration`,
		`key "tunnels"`, `(line 3): "many" is not a whole number`,
		`key "expose"`, `(line 4): want a list of values, found nested settings`,
		`key "listen"`, `(line 5): set twice (first on line 1)`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	for _, goType := range []string{"time.Duration", "int", "[]string", "cliconfig", "unmarshal"} {
		if strings.Contains(msg, goType+" ") || strings.Contains(msg, goType+"\n") || strings.HasSuffix(msg, goType) {
			t.Errorf("error names Go type %q:\n%s", goType, msg)
		}
	}
}

func TestEmptyValueClearsADefault(t *testing.T) {
	cfg, err := resolve(t, nil, "listen:\n", nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "" {
		t.Errorf("listen: with no value should clear the default, got %q", cfg.Listen)
	}
}

func TestListAcceptsCommaValueLikeTheFlag(t *testing.T) {
	cfg, err := resolve(t, nil, "expose: 80, 443\n", nil)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cfg.Expose, "|") != "80|443" {
		t.Errorf("expose = %q", cfg.Expose)
	}
}

func TestNotAMappingAndSyntaxErrorsNameTheFile(t *testing.T) {
	for _, file := range []string{"- a\n- b\n", "listen: [unclosed\n", "a: 1\n---\nb: 2\n"} {
		_, err := resolve(t, nil, file, nil)
		if err == nil || !strings.Contains(err.Error(), "c.yaml") {
			t.Errorf("%q: want an error naming the file, got %v", file, err)
		}
	}
}

func TestEditDistance(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"", "", 0}, {"abc", "abc", 0}, {"advertize", "advertise", 1},
		{"lease", "laese", 1}, {"", "abc", 3}, {"kitten", "sitting", 3},
	} {
		if got := editDistance(tc.a, tc.b); got != tc.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

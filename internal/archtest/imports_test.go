package archtest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/tether-net/tether"

// pkg is what `go list -json` says of one package of the module.
type pkg struct {
	ImportPath   string
	Imports      []string
	TestImports  []string
	XTestImports []string
	Deps         []string
}

// allImports is every import of the package, its tests included.
func (p pkg) allImports() []string {
	return slices.Concat(p.Imports, p.TestImports, p.XTestImports)
}

func (p pkg) rel() string { return strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/") }

// listPackages runs `go list` on the whole module.
func listPackages(t *testing.T) []pkg {
	t.Helper()
	_, here, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(here), "..", "..")
	cmd := exec.Command("go", "list", "-json", "-deps=false", "./...")
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	var pkgs []pkg
	dec := json.NewDecoder(bufio.NewReader(bytes.NewReader(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatalf("decode go list output: %v", err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 10 {
		t.Fatalf("go list found only %d packages; the test is not looking at the tree", len(pkgs))
	}
	return pkgs
}

// rule says which packages of the module may import dep: those whose path
// relative to the module root is one of allowed or lies below one. A rule
// with codeOnly leaves tests free to import dep (an agent test may look
// into the registry; the agent itself may not).
type rule struct {
	dep      string
	allowed  []string
	why      string
	codeOnly bool
	// testsOf are packages whose tests (only) may import dep too.
	testsOf []string
}

var rules = []rule{
	{"github.com/redis/go-redis/v9", []string{"registry"}, "registry is the one place that knows Redis", false, nil},
	// test/hostile speaks yamux itself, as a misbehaving agent would.
	{"github.com/hashicorp/yamux", []string{"tunnel", "test/hostile"}, "tunnel owns the session layer", false, nil},
	// The CLI's tests edit a pinned map by hand to prove `redirector routes --check`.
	// The PS's sk_lookup data plane (ps/skplane_linux.go) is a kernel edge of its own.
	{"github.com/cilium/ebpf", []string{"bpf", "redirector", "ps", "test/bench"}, "only the kernel edge loads BPF", false, []string{"cmd/tether"}},
	{module + "/registry", []string{"registry", "ps", "redirector", "proxy", "cmd", "test", "scripts", "internal/tunneltest"}, "tunnel and agent know nothing of the registry", true, nil},
	{module + "/registry", []string{"registry", "ps", "redirector", "proxy", "cmd", "test", "scripts", "internal", "agent", "deploy"}, "tunnel's tests stand on the wire protocol alone", false, nil},
	{module + "/internal/cliconfig", []string{"internal/cliconfig", "ps", "agent", "redirector", "proxy", "cmd", "test", "scripts"}, "tunnel is the wire protocol, not configuration", false, nil},
	// Roles depend on the layers below them, never on each other; only the
	// command, the test harnesses and the demo put roles together.
	{module + "/ps", []string{"ps", "cmd", "test", "scripts", "internal/tunneltest"}, "roles do not import each other", true, nil},
	{module + "/agent", []string{"agent", "cmd", "test", "scripts", "internal/tunneltest"}, "roles do not import each other", true, nil},
	{module + "/redirector", []string{"redirector", "cmd", "test", "scripts"}, "roles do not import each other", true, nil},
	{module + "/proxy", []string{"proxy", "cmd", "test", "scripts"}, "roles do not import each other", true, nil},
}

func allowedFor(rel string, allowed []string) bool {
	for _, a := range allowed {
		if rel == a || strings.HasPrefix(rel, a+"/") {
			return true
		}
	}
	return false
}

// violations lists the imports of pkgs that break rules.
func violations(pkgs []pkg, rules []rule) []string {
	var out []string
	for _, p := range pkgs {
		for _, r := range rules {
			imports := p.allImports()
			if r.codeOnly || allowedFor(p.rel(), r.testsOf) {
				imports = p.Imports
			}
			for _, imp := range imports {
				if (imp == r.dep || strings.HasPrefix(imp, r.dep+"/")) && !allowedFor(p.rel(), r.allowed) {
					out = append(out, fmt.Sprintf("%s imports %s (%s)", p.ImportPath, imp, r.why))
				}
			}
		}
	}
	return out
}

func TestImportRules(t *testing.T) {
	for _, v := range violations(listPackages(t), rules) {
		t.Error(v)
	}
}

// The agent runs on every host, often without BPF privileges: it must not
// even link cilium/ebpf through some other package.
func TestAgentDoesNotLinkEBPF(t *testing.T) {
	cmd := exec.Command("go", "list", "-deps", module+"/agent")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps agent: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "github.com/cilium/ebpf") {
			t.Fatalf("agent links %s", dep)
		}
	}
}

// The checker itself must be able to fail: a package that breaks each rule
// is reported.
func TestViolationsAreFound(t *testing.T) {
	bad := []pkg{
		{ImportPath: module + "/tunnel", Imports: []string{module + "/registry", module + "/internal/cliconfig"}},
		{ImportPath: module + "/agent", Imports: []string{module + "/registry"}, TestImports: []string{"github.com/hashicorp/yamux"}},
		{ImportPath: module + "/proxy", XTestImports: []string{"github.com/redis/go-redis/v9/internal/pool", "github.com/cilium/ebpf/link"}},
	}
	if got := violations(bad, rules); len(got) != 7 {
		t.Fatalf("found %d violations, want 7:\n%s", len(got), strings.Join(got, "\n"))
	}
	good := []pkg{
		{ImportPath: module + "/registry", Imports: []string{"github.com/redis/go-redis/v9"}},
		{ImportPath: module + "/test/bench/redirector", Imports: []string{"github.com/cilium/ebpf"}},
		{ImportPath: module + "/tunnel", Imports: []string{"github.com/hashicorp/yamux", module + "/internal/relay"}},
		{ImportPath: module + "/agent", TestImports: []string{module + "/registry"}},
	}
	if got := violations(good, rules); len(got) != 0 {
		t.Fatalf("allowed imports reported: %v", got)
	}
}

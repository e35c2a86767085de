// Package quickstart runs the README's by-hand quickstart as a user would
// copy it: scripts/quickstart.sh, which the README quotes verbatim.
package quickstart

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
)

const script = "../../scripts/quickstart.sh"

// The README shows the script itself, so following the README is running
// this script: any edit to one without the other fails here.
func TestREADMEQuotesTheQuickstartVerbatim(t *testing.T) {
	body, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	// Everything after the shebang line, as one block.
	_, rest, _ := strings.Cut(string(body), "\n")
	if !strings.Contains(string(readme), "```bash\n"+rest+"```") {
		t.Fatal("README.md does not quote scripts/quickstart.sh verbatim (from its second line, in a ```bash block): update one from the other")
	}
}

// The quickstart, run as written on this machine, reaches the agent from
// inside the cgroup and not from outside it.
func TestQuickstartWorks(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, b := range []string{"redis-server", "curl", "python3"} {
		testutil.RequireBinary(t, b)
	}
	bin := filepath.Join(t.TempDir(), "tether")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/tether").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	// Free ports instead of the defaults, so the test cannot collide with
	// another test (or a Redis) on this machine; the range is the PS's
	// data ports.
	cmd := exec.Command("bash", script)
	cmd.Env = append(os.Environ(), "TETHER="+bin,
		fmt.Sprintf("REDIS_PORT=%d", testutil.FreePort(t)),
		fmt.Sprintf("PS_PORT=%d", testutil.FreePort(t)),
		fmt.Sprintf("SERVICE_PORT=%d", testutil.FreePort(t)),
		"PS_PORTS="+tunneltest.FreeRange(t, 10))
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("the quickstart did not finish in 2 minutes:\n%s", out)
	}
	text := string(out)
	t.Logf("quickstart output:\n%s", text)
	if err != nil {
		t.Fatalf("the quickstart failed: %v", err)
	}
	outside, inside, ok := strings.Cut(text, "inside the cgroup:")
	if !ok || !strings.Contains(inside, "hello from a1") {
		t.Fatal("the curl inside the cgroup did not reach the agent")
	}
	if strings.Contains(outside, "hello from a1") {
		t.Fatal("the curl outside the cgroup reached the agent: the redirect is not what made it work")
	}
}

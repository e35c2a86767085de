package redirector

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// RunClient runs the test binary in cg as the client of mode (clientMain
// in stack_linux_test.go, which TestMain runs instead of the tests)
// with arg, within timeout, and returns what follows prefix on the line of
// its output that starts with it.
func RunClient(t *testing.T, cg *testutil.Cgroup, mode, arg, prefix string, timeout time.Duration) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$", arg)
	cmd.Env = append(os.Environ(), "TETHER_TEST_CLIENT="+mode)
	cmd.WaitDelay = time.Second
	done := cg.Command(t, cmd)
	defer done()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s client in the cgroup: %v\n%s", mode, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(l, prefix); ok {
			return rest
		}
	}
	t.Fatalf("%s client printed no %q line:\n%s", mode, prefix, out)
	return ""
}

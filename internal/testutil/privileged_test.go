package testutil

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// probeChildEnv makes TestRequirePrivilegedProbe call the probe; the other
// tests run it in a child process with the flags and environment they check.
const probeChildEnv = "TETHER_TESTUTIL_PROBE_CHILD"

func TestRequirePrivilegedProbe(t *testing.T) {
	if os.Getenv(probeChildEnv) != "1" {
		return // only meaningful in the child started below
	}
	RequirePrivileged(t)
	t.Log("privileged test ran")
}

func runProbe(t *testing.T, privileged string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestRequirePrivilegedProbe$", "-test.v"}, args...)...)
	cmd.Env = append(os.Environ(), probeChildEnv+"=1", PrivilegedEnv+"="+privileged)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestShortModeSkipsPrivilegedTestsEvenAsRoot(t *testing.T) {
	out, err := runProbe(t, "0", "-test.short")
	if err != nil || !strings.Contains(out, ShortSkipReason) || strings.Contains(out, "privileged test ran") {
		t.Fatalf("with -short and %s=0 the probe must skip with %q: %v\n%s", PrivilegedEnv, ShortSkipReason, err, out)
	}
}

func TestShortModeWithPrivilegedRunIsAFailure(t *testing.T) {
	out, err := runProbe(t, "1", "-test.short")
	if err == nil || !strings.Contains(out, "--- FAIL") || !strings.Contains(out, "drop -short") {
		t.Fatalf("-short with %s=1 must fail and say why: %v\n%s", PrivilegedEnv, err, out)
	}
}

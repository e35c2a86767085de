package testutil

import (
	"os"
	"testing"
)

// PrivilegedEnv, when set to 1, turns every privilege skip into a failure.
const PrivilegedEnv = "TETHER_TEST_PRIVILEGED"

// RequirePrivileged skips t when the process is not root, or fails it when
// TETHER_TEST_PRIVILEGED=1 says this run must not skip.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(PrivilegedEnv) == "1" {
		t.Fatalf("this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and %s=1 forbids skipping it", PrivilegedEnv)
	}
	t.Skip("skipped: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run as root, or set " + PrivilegedEnv + "=1 to make this a failure")
}

// RequireBinary skips (or, under TETHER_TEST_PRIVILEGED=1, fails) when a
// program the test needs is not installed. scripts/setup.sh installs them all.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := lookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv(PrivilegedEnv) == "1" {
		t.Fatalf("%s is not installed (run scripts/setup.sh): %v", name, err)
	}
	t.Skipf("skipped: %s is not installed (run scripts/setup.sh)", name)
	return ""
}

package testutil

import (
	"os"
	"testing"

	"github.com/tether-net/tether/internal/execpath"
)

// PrivilegedEnv, when set to 1, turns every privilege skip into a failure.
const PrivilegedEnv = "TETHER_TEST_PRIVILEGED"

// ShortSkipReason is why RequirePrivileged skips under -short.
const ShortSkipReason = "privileged test skipped in -short mode"

// RequirePrivileged skips t when the process is not root, or fails it when
// TETHER_TEST_PRIVILEGED=1 says this run must not skip.
//
// Under -short (make test-unit) it skips even as root: -short means "only
// the tests that need no privileges". With TETHER_TEST_PRIVILEGED=1 as well,
// the two ask for opposite things, and the test fails saying so.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if testing.Short() {
		if os.Getenv(PrivilegedEnv) == "1" {
			t.Fatalf("-short skips privileged tests but %s=1 forbids skipping them: drop -short, or set %s=0", PrivilegedEnv, PrivilegedEnv)
		}
		t.Skip(ShortSkipReason)
	}
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(PrivilegedEnv) == "1" {
		t.Fatalf("this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) and %s=1 forbids skipping it", PrivilegedEnv)
	}
	t.Skip("skipped: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON); run as root, or set " + PrivilegedEnv + "=1 to make this a failure")
}

// RequireBinary skips (or, under TETHER_TEST_PRIVILEGED=1, fails) when a
// program the test needs is not installed. scripts/setup.sh installs them all.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := execpath.Look(name)
	if err == nil {
		return p
	}
	if os.Getenv(PrivilegedEnv) == "1" {
		t.Fatalf("%s is not installed (run scripts/setup.sh): %v", name, err)
	}
	t.Skipf("skipped: %s is not installed (run scripts/setup.sh)", name)
	return ""
}

// netnsEnv marks a test binary that MainInPrivateNetns (Linux) started in
// a network namespace of its own.
const netnsEnv = "TETHER_TEST_PRIVATE_NETNS"

// InPrivateNetns reports whether this test binary runs in the network
// namespace MainInPrivateNetns created for it.
func InPrivateNetns() bool { return os.Getenv(netnsEnv) == "1" }

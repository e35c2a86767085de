// Package testutil owns the test helpers that touch real parts: a real
// redis-server per test, the privilege probe, a fresh cgroup per test, and
// small waiting helpers, so that no test sleeps blindly.
//
// Privileged tests call RequirePrivileged: it skips with a reason for a normal
// user, but fails when TETHER_TEST_PRIVILEGED=1 (set by CI), so that nothing
// skips silently there. Under -short (make test-unit) it skips even as root,
// and fails if TETHER_TEST_PRIVILEGED=1 as well, since the two contradict.
package testutil

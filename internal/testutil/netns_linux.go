package testutil

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
)

// MainInPrivateNetns runs a package's tests in a network namespace created
// for this run, when the process may create one (root, not -short): it
// starts the test binary again with the same arguments in a new network
// namespace, and returns its exit code. In the child it brings loopback up
// and calls run (m.Run, with whatever setup the package's TestMain does
// around it). Without the privilege it calls run where it is, and
// InPrivateNetns reports false.
//
// Why: a PS that steers its data ports with sk_lookup attaches a BPF
// program to its whole network namespace. Tests must never attach one to
// the machine's own namespace, so a package whose tests run such a PS
// runs entirely in a namespace of its own, together with the redis-server
// and the agents its tests start (children inherit it). The namespace has
// nothing but loopback: nothing the tests do can reach another host.
func MainInPrivateNetns(run func() int) int {
	if os.Getenv(netnsEnv) == "1" {
		if err := loopbackUp(); err != nil {
			fmt.Fprintf(os.Stderr, "private network namespace: bring loopback up: %v\n", err)
			return 1
		}
		return run()
	}
	if os.Geteuid() != 0 || shortFlag() {
		return run()
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "private network namespace: %v\n", err)
		return 1
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"=1")
	// The child dies with this process, so an interrupted run leaves no
	// test binary behind (its namespace goes with it).
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return ee.ExitCode()
	default:
		fmt.Fprintf(os.Stderr, "private network namespace: run the tests in it: %v\n", err)
		return 1
	}
}

// shortFlag reports whether -test.short was given; testing.Short cannot be
// called before m.Run parses the flags.
func shortFlag() bool {
	for _, a := range os.Args[1:] {
		switch a {
		case "-test.short", "-test.short=true", "--test.short", "--test.short=true":
			return true
		}
	}
	return false
}

func loopbackUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}

// RequirePrivateNetns skips t unless it runs in a network namespace of its
// own (see MainInPrivateNetns), as RequirePrivileged does for root: a
// privileged run always has one, so in CI this never skips.
func RequirePrivateNetns(t testing.TB) {
	t.Helper()
	RequirePrivileged(t)
	if !InPrivateNetns() {
		t.Fatal("this test attaches BPF to its network namespace and must run in one of its own: call testutil.MainInPrivateNetns from the package's TestMain")
	}
}

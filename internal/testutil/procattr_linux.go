package testutil

import "syscall"

// dieWithParent makes a helper process die with the test binary, so a
// crashed test leaves no redis-server behind.
func dieWithParent() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

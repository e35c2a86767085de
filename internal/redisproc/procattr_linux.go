package redisproc

import "syscall"

// dieWithParent makes redis-server die with the process that started it, so
// a crashed test or benchmark leaves no server behind.
func dieWithParent() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

//go:build !linux

package redisproc

import "syscall"

// dieWithParent has no portable equivalent of Pdeathsig: elsewhere a crashed
// parent may leave its redis-server running.
func dieWithParent() *syscall.SysProcAttr { return &syscall.SysProcAttr{} }

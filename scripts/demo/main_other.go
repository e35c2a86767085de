//go:build !linux

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "demo: needs Linux (network namespaces, cgroup v2, eBPF)")
	os.Exit(1)
}

//go:build !linux

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "scale: needs Linux (network namespaces, sk_lookup, cgroup v2, eBPF)")
	os.Exit(1)
}

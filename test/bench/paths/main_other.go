//go:build !linux

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "paths: needs Linux (/proc CPU accounting, network namespaces)")
	os.Exit(1)
}

// Package execpath owns finding the programs tether's tests, benchmarks and
// demo start (redis-server, nsenter, bpftool, ...): in PATH, and then in
// the sbin and local directories that a non-root PATH often lacks.
package execpath

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// dirs are searched, in order, after PATH.
var dirs = []string{"/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"}

// Look returns the path of the program name, or an error naming it.
func Look(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or the sbin directories", name)
}

// Package cgroup2 owns finding the cgroup v2 hierarchy on this host. On
// hybrid hosts it is not at /sys/fs/cgroup (here it is /sys/fs/cgroup/unified),
// so it is always looked up in /proc/mounts and never assumed.
package cgroup2

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
)

// ErrNotMounted means no cgroup2 file system is mounted on this host.
var ErrNotMounted = errors.New("no cgroup v2 file system is mounted (see /proc/mounts)")

// Mount returns the mount point of the cgroup v2 hierarchy.
func Mount() (string, error) {
	return mountFrom("/proc/mounts")
}

func mountFrom(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return unescape(fields[1]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	return "", ErrNotMounted
}

// unescape undoes the octal escapes /proc/mounts uses for blanks in paths.
func unescape(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

package cgroup2

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestMountFindsCgroup2AmongV1Mounts(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mounts")
	data := "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/un\\040ified cgroup2 rw 0 0\n"
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := mountFrom(p)
	if err != nil || got != "/sys/fs/cgroup/un ified" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestMountReportsMissingCgroup2(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mounts")
	if err := os.WriteFile(p, []byte("proc /proc proc rw 0 0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := mountFrom(p); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("want ErrNotMounted, got %v", err)
	}
}

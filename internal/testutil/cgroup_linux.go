package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/cgroup2"
)

// Cgroup is a fresh cgroup v2 directory created for one test under the
// cgroup2 mount's tether-test subtree. It is never the root cgroup.
type Cgroup struct {
	Path string
}

// NewCgroup creates a cgroup with a unique name for t and removes it in t's
// cleanup, after killing any process still in it. The test must be
// privileged.
func NewCgroup(t testing.TB) *Cgroup {
	t.Helper()
	RequirePrivileged(t)
	mnt, err := cgroup2.Mount()
	if err != nil {
		t.Fatalf("cgroup v2: %v", err)
	}
	parent := filepath.Join(mnt, sharedParent)
	path, err := mkdirUnder(parent, UniqueName("cg"))
	if err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	cg := &Cgroup{Path: path}
	t.Cleanup(func() {
		cg.remove(t, mnt)
		// The shared parent goes too once the last test's cgroup is gone.
		if err := removeIfEmpty(parent); err != nil {
			t.Errorf("remove the shared test cgroup: %v", err)
		}
	})
	return cg
}

// sharedParent is the cgroup, under the cgroup2 mount, that holds every
// test's cgroup. Test packages run in parallel processes: each creates it
// when it needs it and tries to remove it when its own cgroup is gone.
const sharedParent = "tether-test"

// mkdirUnder creates parent (if needed) and then parent/name, and returns
// the latter. Another process may remove parent between the two steps (its
// last child just went); then Mkdir fails with ENOENT and it tries again.
// Not os.MkdirAll: when its mkdir fails with EEXIST it checks the directory
// again, and fails if the directory has just been removed.
func mkdirUnder(parent, name string) (string, error) {
	path := filepath.Join(parent, name)
	var err error
	for range 100 {
		if err = os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("create %s: %w", parent, err)
		}
		if err = os.Mkdir(path, 0o755); !errors.Is(err, os.ErrNotExist) {
			break
		}
	}
	if err != nil {
		return "", fmt.Errorf("create cgroup %s: %w", path, err)
	}
	return path, nil
}

// removeIfEmpty removes the cgroup dir unless it still has children (EBUSY,
// ENOTEMPTY: another test's cgroup) or is already gone (ENOENT: another
// process removed it first).
func removeIfEmpty(dir string) error {
	err := os.Remove(dir)
	if err == nil || errors.Is(err, syscall.EBUSY) || errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.ENOENT) {
		return nil
	}
	return err
}

// Command returns cmd prepared to start directly inside the cgroup
// (clone3 with CLONE_INTO_CGROUP), so not even its first instruction runs
// outside it. The returned cleanup closes the cgroup's directory handle;
// call it after cmd.Start.
func (c *Cgroup) Command(t testing.TB, cmd *exec.Cmd) (done func()) {
	t.Helper()
	f, err := os.Open(c.Path)
	if err != nil {
		t.Fatalf("open cgroup %s: %v", c.Path, err)
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = int(f.Fd())
	return func() { _ = f.Close() }
}

// Run runs name with args inside the cgroup and returns its combined output.
func (c *Cgroup) Run(t testing.TB, name string, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	done := c.Command(t, cmd)
	defer done()
	return cmd.CombinedOutput()
}

func (c *Cgroup) remove(t testing.TB, mnt string) {
	// Kill whatever the test left inside, then remove the directory; a cgroup
	// with live members cannot be removed.
	_ = os.WriteFile(filepath.Join(c.Path, "cgroup.kill"), []byte("1"), 0o644)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(c.Path)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			procs, _ := os.ReadFile(filepath.Join(c.Path, "cgroup.procs"))
			t.Errorf("remove cgroup %s: %v (members: %s)", c.Path, err, strings.TrimSpace(string(procs)))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// UniqueName returns prefix plus a random suffix, short enough for
// interface and namespace names (at most 15 bytes for prefixes up to 5).
func UniqueName(prefix string) string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

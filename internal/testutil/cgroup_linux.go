package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
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
// cleanup, after moving any process still in it back to the root cgroup's
// test parent. The test must be privileged.
func NewCgroup(t testing.TB) *Cgroup {
	t.Helper()
	RequirePrivileged(t)
	mnt, err := cgroup2.Mount()
	if err != nil {
		t.Fatalf("cgroup v2: %v", err)
	}
	parent := filepath.Join(mnt, "tether-test")
	if err := os.MkdirAll(parent, 0o755); err != nil {
		t.Fatalf("create %s: %v", parent, err)
	}
	path := filepath.Join(parent, UniqueName("cg"))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", path, err)
	}
	cg := &Cgroup{Path: path}
	t.Cleanup(func() {
		cg.remove(t, mnt)
		// The shared parent goes too once the last test's cgroup is gone;
		// rmdir of a cgroup that still has children fails harmlessly.
		_ = os.Remove(parent)
	})
	return cg
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

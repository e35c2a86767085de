package container_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// podman runs podman with everything it keeps under one private directory:
// image and container storage (--root), run state (--runroot), temporary
// files, the events log and the configuration files. Nothing global
// changes, and removing the directory removes all the test made.
type podman struct {
	t   *testing.T
	bin string
	dir string
	env []string
}

// runcDefaultRoot is where runc keeps container state unless given --root.
const runcDefaultRoot = "/run/runc"

// podmanCommandTimeout bounds one podman command; a build or a run that
// hangs fails the test instead of the whole test binary.
const podmanCommandTimeout = 3 * time.Minute

// newPodman prepares the private directory and configuration, and removes
// every container, image and file in the test's cleanup.
func newPodman(t *testing.T) *podman {
	t.Helper()
	bin := testutil.RequireBinary(t, "podman")
	testutil.RequireBinary(t, "runc") // the runtime containers.conf names
	// A short path: conmon's attach sockets live under the run root, and a
	// unix socket path is limited to 108 bytes.
	dir, err := os.MkdirTemp("", "tether-podman-")
	if err != nil {
		t.Fatal(err)
	}
	p := &podman{t: t, bin: bin, dir: dir}
	// conmon cleans up a container that exited by itself with
	// "podman container cleanup", to which podman 4.3 does not pass
	// --runtime-flag: runc then uses its default state root, /run/runc, and
	// creates it. Remove it again if it was not there before and is empty
	// (a Remove of a directory holding another user's state fails).
	if _, err := os.Stat(runcDefaultRoot); errors.Is(err, os.ErrNotExist) {
		t.Cleanup(func() { _ = os.Remove(runcDefaultRoot) })
	}
	// Registered after the /run/runc cleanup, so it runs before it.
	t.Cleanup(p.removeAll)
	for _, sub := range []string{"root", "runroot", "runc", "tmp", "events", "image-copy", "volumes", "net.d"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	conf := p.writeConf(t)
	storage := filepath.Join(dir, "storage.conf")
	// vfs: plain directories, no overlay mounts to leak if the test dies.
	writeFile(t, storage, fmt.Sprintf("[storage]\ndriver = \"vfs\"\ngraphroot = %q\nrunroot = %q\n",
		filepath.Join(dir, "root"), filepath.Join(dir, "runroot")), 0o600)
	// No registries at all: FROM scratch pulls nothing, and a test that
	// tried to pull would fail here instead of reaching the network.
	registries := filepath.Join(dir, "registries.conf")
	writeFile(t, registries, "unqualified-search-registries = []\n", 0o600)
	p.env = []string{
		"CONTAINERS_CONF=" + conf,
		"CONTAINERS_STORAGE_CONF=" + storage,
		"CONTAINERS_REGISTRIES_CONF=" + registries,
		"TMPDIR=" + filepath.Join(dir, "tmp"),
	}
	return p
}

// writeConf writes deploy/container/containers.conf as it is, plus the
// locations of podman's temporary files inside the private directory.
func (p *podman) writeConf(t *testing.T) string {
	t.Helper()
	tmpl, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy", "container", "containers.conf"))
	if err != nil {
		t.Fatalf("read the containers.conf the image documents: %v", err)
	}
	engine := "\n[engine]\n"
	if !strings.Contains(string(tmpl), engine) {
		t.Fatalf("deploy/container/containers.conf has no [engine] table")
	}
	private := fmt.Sprintf("%stmp_dir = %q\nevents_logfile_path = %q\nimage_copy_tmp_dir = %q\nvolume_path = %q\n",
		engine, filepath.Join(p.dir, "tmp"), filepath.Join(p.dir, "events", "events.log"),
		filepath.Join(p.dir, "image-copy"), filepath.Join(p.dir, "volumes"))
	conf := strings.Replace(string(tmpl), engine, private, 1) +
		fmt.Sprintf("\n[network]\nnetwork_config_dir = %q\n", filepath.Join(p.dir, "net.d"))
	path := filepath.Join(p.dir, "containers.conf")
	writeFile(t, path, conf, 0o600)
	return path
}

// globalFlags repeat what the configuration says, so that no file podman
// might read besides it (a storage.conf in /etc) can move the storage.
func (p *podman) globalFlags() []string {
	return []string{
		"--root", filepath.Join(p.dir, "root"),
		"--runroot", filepath.Join(p.dir, "runroot"),
		"--tmpdir", filepath.Join(p.dir, "tmp"),
		"--storage-driver", "vfs",
		"--cgroup-manager", "cgroupfs",
		"--events-backend", "file",
		"--network-config-dir", filepath.Join(p.dir, "net.d"),
		"--runtime", "runc",
		// runc keeps its state under /run/runc unless told otherwise.
		"--runtime-flag", "root=" + filepath.Join(p.dir, "runc"),
	}
}

// buildWrapper writes a script that runs podman, with the private flags,
// in a mount namespace of its own where /var/lib is an empty tmpfs: as
// root, containers/image keeps its blob info cache in
// /var/lib/containers/cache whatever --root says, and a build writes it.
// The script is what `make image` gets as PODMAN.
func (p *podman) buildWrapper(t *testing.T) string {
	t.Helper()
	unshare := testutil.RequireBinary(t, "unshare")
	script := fmt.Sprintf("#!/bin/sh\nexec %s --mount --propagation private /bin/sh -c 'mount -t tmpfs -o mode=0700 tether-podman /var/lib && exec \"$@\"' sh %s %s \"$@\"\n",
		unshare, p.bin, strings.Join(p.globalFlags(), " "))
	path := filepath.Join(p.dir, "podman-build")
	writeFile(t, path, script, 0o700)
	return path
}

// command is podman with the private flags, then args.
func (p *podman) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, p.bin, append(p.globalFlags(), args...)...)
	cmd.Env = append(os.Environ(), p.env...)
	return cmd
}

// run runs podman args and returns its combined output.
func (p *podman) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), podmanCommandTimeout)
	defer cancel()
	out, err := p.command(ctx, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("podman %s: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
}

// must runs podman args and fails the test when it fails.
func (p *podman) must(args ...string) string {
	p.t.Helper()
	out, err := p.run(args...)
	if err != nil {
		p.t.Fatalf("%v\n%s", err, out)
	}
	return strings.TrimSpace(out)
}

// removeAll removes every container and image of this run, then the
// private directory. A mount left under it (a container's /dev/shm) is
// detached first, and reported, since it means podman did not clean up.
func (p *podman) removeAll() {
	t := p.t
	if out, err := p.run("rm", "--all", "--force", "--time", "0"); err != nil {
		t.Errorf("remove the test's containers: %v\n%s", err, out)
	}
	if out, err := p.run("rmi", "--all", "--force"); err != nil {
		t.Errorf("remove the test's images: %v\n%s", err, out)
	}
	// conmon runs "podman container cleanup" with the private flags once a
	// container exits, after the rm above returned; it would create the
	// directory again. Wait until no process names it.
	if err := testutil.Poll(context.Background(), 20*time.Second, func() error {
		if pids := processesNaming(p.dir); len(pids) > 0 {
			return fmt.Errorf("processes %v still use %s", pids, p.dir)
		}
		return nil
	}); err != nil {
		t.Errorf("podman's helpers did not finish: %v", err)
	}
	for _, m := range mountsUnder(p.dir) {
		t.Errorf("podman left %s mounted; detaching it", m)
		_ = syscall.Unmount(m, syscall.MNT_DETACH)
	}
	if err := os.RemoveAll(p.dir); err != nil {
		t.Errorf("remove podman's private directory: %v", err)
	}
}

// processesNaming lists the pids whose command line contains s.
func processesNaming(s string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmdline), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// mountsUnder lists the mount points under dir, deepest first.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil
	}
	defer f.Close()
	var found []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && strings.HasPrefix(fields[1], dir+"/") {
			found = append([]string{fields[1]}, found...)
		}
	}
	return found
}

// container is one detached container the test started.
type container struct {
	p    *podman
	name string
}

// start runs a detached container; its log is printed when the test fails.
// The containers are removed by the podman cleanup.
func (p *podman) start(name string, args ...string) *container {
	p.t.Helper()
	p.must(append([]string{"run", "--detach", "--name", name}, args...)...)
	c := &container{p: p, name: name}
	p.t.Cleanup(func() {
		if p.t.Failed() {
			p.t.Logf("container %s log:\n%s", name, c.logs())
		}
	})
	return c
}

// logs is what the container wrote so far.
func (c *container) logs() string {
	out, err := c.p.run("logs", c.name)
	if err != nil {
		return fmt.Sprintf("(no log: %v) %s", err, out)
	}
	return out
}

// pid is the host pid of the container's process, or an error when it is
// not running (then with its log, which says why).
func (c *container) pid() (int, error) {
	out, err := c.p.run("inspect", "--format", "{{.State.Pid}} {{.State.Status}}", c.name)
	if err != nil {
		return 0, fmt.Errorf("%w: %s", err, out)
	}
	var pid int
	var status string
	if _, err := fmt.Sscan(out, &pid, &status); err != nil {
		return 0, fmt.Errorf("inspect %s: %q: %w", c.name, out, err)
	}
	if status != "running" || pid == 0 {
		return 0, fmt.Errorf("container %s is %s:\n%s", c.name, status, c.logs())
	}
	return pid, nil
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	// WriteFile's mode passes through the umask; the containers' user
	// reads some of these files, so the mode must be exactly what we said.
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// repoRoot is the module's directory, where the Makefile and deploy/ are.
func repoRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		t.Fatal(errors.New("go env GOMOD: not inside the tether module"))
	}
	return filepath.Dir(mod)
}

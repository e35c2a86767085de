package redirector

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cgroup2"
)

// hook is one cgroup program and the name of its pinned link.
type hook struct {
	name   string // pin name of the link
	attach ebpf.AttachType
	prog   func(*bpf.RedirectObjects) *ebpf.Program
}

var hooks = []hook{
	{"link_connect4", ebpf.AttachCGroupInet4Connect, func(o *bpf.RedirectObjects) *ebpf.Program { return o.TetherConnect4 }},
	{"link_connect6", ebpf.AttachCGroupInet6Connect, func(o *bpf.RedirectObjects) *ebpf.Program { return o.TetherConnect6 }},
	{"link_getpeername4", ebpf.AttachCgroupInet4GetPeername, func(o *bpf.RedirectObjects) *ebpf.Program { return o.TetherGetpeername4 }},
	{"link_getpeername6", ebpf.AttachCgroupInet6GetPeername, func(o *bpf.RedirectObjects) *ebpf.Program { return o.TetherGetpeername6 }},
}

// --- intent-carrying SYN (bpf/intent.c) ---

// intentHook is the sockops program that writes the intent option into the
// SYN of redirected connections. It is its own object (it needs no route
// map) sharing the pinned tether_orig_dst, so its program comes from
// Installation.intent, not from the redirect objects.
var intentHook = hook{name: "link_intent", attach: ebpf.AttachCGroupSockOps}

// loadIntent loads bpf/intent.c against the maps pinned in dir (the redirect
// object pinned them first) and attaches it to cgroup, or swaps it into the
// pinned link.
func (in *Installation) loadIntent(dir, cgroup string) error {
	spec, err := bpf.LoadIntent()
	if err != nil {
		return fmt.Errorf("load intent eBPF spec: %w", err)
	}
	if err := spec.LoadAndAssign(&in.intent, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load intent sockops program (verifier; needs Linux >= 5.10 header options): %+v", ve)
		}
		return permissionHint(fmt.Errorf("load intent sockops program: %w", err))
	}
	return attachOrUpdate(dir, cgroup, intentHook, in.intent.TetherIntent)
}

// --- end intent ---

// sockopsHooks are the pinned links of the sockops programs, each its own
// object loaded after the redirect object: the intent-carrying SYN and
// passive health (health_linux.go).
var sockopsHooks = []hook{intentHook, healthHook}

// allHooks is every pinned link an installation may hold.
func allHooks() []hook { return append(hooks[:len(hooks):len(hooks)], sockopsHooks...) }

// Installation is the loaded programs and maps, attached to a cgroup and
// pinned under a directory. Closing it releases this process's handles and
// leaves the pins, so redirection goes on after the process exits.
type Installation struct {
	objs    bpf.RedirectObjects
	intent  bpf.IntentObjects // the intent-carrying SYN (loadIntent)
	health  bpf.HealthObjects // passive health (loadHealth)
	PinDir  string
	Cgroup  string
	Updated bool // programs were swapped on existing links (a restart)
}

// Close releases the handles; the pinned maps and links stay.
func (in *Installation) Close() error {
	return errors.Join(in.objs.Close(), in.intent.Close(), in.health.Close())
}

// Probe reports, as a clear error, what this kernel or process lacks to
// run the redirector.
func Probe() error {
	if err := features.HaveProgramType(ebpf.CGroupSockAddr); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("kernel lacks cgroup sock_addr programs (cgroup/connect4): %w", err)
		}
		return permissionHint(fmt.Errorf("probe cgroup/connect4 support: %w", err))
	}
	for _, fn := range []asm.BuiltinFunc{asm.FnSkStorageGet, asm.FnSetRetval} {
		if err := features.HaveProgramHelper(ebpf.CGroupSockAddr, fn); err != nil {
			return permissionHint(fmt.Errorf("kernel lacks helper %s for cgroup/connect4 (needs Linux >= 5.18): %w", fn, err))
		}
	}
	return nil
}

func permissionHint(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("%w (run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)", err)
	}
	return err
}

// EnsureBPFFS mounts bpffs at /sys/fs/bpf when dir is on no bpffs yet.
func EnsureBPFFS(dir string) error {
	var st unix.Statfs_t
	parent := dir
	for {
		if err := unix.Statfs(parent, &st); err == nil {
			break
		}
		next := filepath.Dir(parent)
		if next == parent {
			break
		}
		parent = next
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if !strings.HasPrefix(filepath.Clean(dir), "/sys/fs/bpf") {
		return fmt.Errorf("pin dir %s is not on a bpf file system", dir)
	}
	if err := os.MkdirAll("/sys/fs/bpf", 0o755); err != nil {
		return fmt.Errorf("create /sys/fs/bpf: %w", err)
	}
	if err := unix.Mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700"); err != nil {
		return permissionHint(fmt.Errorf("mount bpffs at /sys/fs/bpf: %w", err))
	}
	return nil
}

// ResolveCgroup returns the absolute cgroup v2 directory to attach to:
// path, taken relative to the cgroup2 mount unless absolute. It is
// required: there is no default (see Config.Cgroup).
func ResolveCgroup(path string) (string, error) {
	if path == "" {
		return "", errNoCgroup
	}
	mnt, err := cgroup2.Mount()
	if err != nil {
		return "", err
	}
	if !filepath.IsAbs(path) {
		path = filepath.Join(mnt, path)
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("cgroup %s: %w", path, err)
	}
	if !st.IsDir() {
		return "", fmt.Errorf("cgroup %s is not a directory", path)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil || fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return "", fmt.Errorf("cgroup %s is not in the cgroup v2 hierarchy (mounted at %s)", path, mnt)
	}
	return path, nil
}

// IsRootCgroup reports whether path is the root of the cgroup2 mount, the
// cgroup of every process of the host (or of the cgroup namespace). The
// same directory reached by another name counts too.
func IsRootCgroup(path string) bool {
	mnt, err := cgroup2.Mount()
	if err != nil {
		return false
	}
	a, errA := os.Stat(path)
	b, errB := os.Stat(mnt)
	return errA == nil && errB == nil && os.SameFile(a, b)
}

// Install loads the programs, pins their maps and attaches them to cgroup,
// pinning the links under pinDir. When pinDir already holds an installation,
// the pinned maps are reused and the new programs replace the old ones on the
// pinned links atomically, so redirection never stops.
func Install(pinDir, cgroup string, mapSize uint32) (*Installation, error) {
	if err := Probe(); err != nil {
		return nil, err
	}
	if err := EnsureBPFFS(pinDir); err != nil {
		return nil, err
	}
	spec, err := bpf.LoadRedirect()
	if err != nil {
		return nil, fmt.Errorf("load eBPF spec: %w", err)
	}
	var specs bpf.RedirectSpecs
	if err := spec.Assign(&specs); err != nil {
		return nil, fmt.Errorf("assign eBPF spec: %w", err)
	}
	if mapSize > 0 {
		specs.TetherRoutes.MaxEntries = mapSize
	}

	existing := dirExists(pinDir)
	// A first install builds everything in a fresh directory and renames it
	// into place, so a crash half-way never leaves a half-made pin dir.
	workDir := pinDir
	if !existing {
		// bpffs refuses names with dots, so no ".tmp" style here.
		workDir = filepath.Join(filepath.Dir(pinDir), filepath.Base(pinDir)+"-installing-"+randHex())
		if err := os.MkdirAll(workDir, 0o700); err != nil {
			return nil, fmt.Errorf("create pin dir: %w", permissionHint(err))
		}
		defer os.RemoveAll(workDir) // no-op once renamed
	}

	in := &Installation{PinDir: pinDir, Cgroup: cgroup, Updated: existing}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: workDir}}
	if err := spec.LoadAndAssign(&in.objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load eBPF programs (verifier): %+v", ve)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("pinned maps in %s do not match this version (run `tether redirector uninstall` first): %w", pinDir, err)
		}
		return nil, permissionHint(fmt.Errorf("load eBPF programs: %w", err))
	}

	for _, h := range hooks {
		if err := attachOrUpdate(workDir, cgroup, h, h.prog(&in.objs)); err != nil {
			in.objs.Close()
			return nil, err
		}
	}
	if err := in.loadIntent(workDir, cgroup); err != nil {
		in.Close()
		return nil, err
	}
	if err := in.loadHealth(workDir, cgroup); err != nil {
		in.Close()
		return nil, err
	}
	if !existing {
		if err := os.Rename(workDir, pinDir); err != nil {
			in.Close()
			return nil, fmt.Errorf("move pins into %s: %w", pinDir, err)
		}
	}
	return in, nil
}

// attachOrUpdate swaps prog into the pinned link of h, or attaches prog to
// the cgroup and pins the new link.
func attachOrUpdate(dir, cgroup string, h hook, prog *ebpf.Program) error {
	pin := filepath.Join(dir, h.name)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(prog); err != nil {
			return fmt.Errorf("replace program on pinned link %s: %w", pin, err)
		}
		return nil
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: prog})
	if err != nil {
		return permissionHint(fmt.Errorf("attach %s to cgroup %s: %w", h.name, cgroup, err))
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}

// Uninstall detaches every pinned link under pinDir and removes the pins.
// It is not an error when nothing is installed.
func Uninstall(pinDir string) error {
	if !dirExists(pinDir) {
		return nil
	}
	var errs []error
	for _, h := range allHooks() {
		pin := filepath.Join(pinDir, h.name)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("open pinned link %s: %w", pin, err))
			}
			continue
		}
		// Detach ends the attachment now. Without it the attachment ends
		// only when the kernel frees the unpinned link, after an RCU grace
		// period and from a workqueue, so a connect() right after Uninstall
		// returned could still be redirected (seen in the e2e suite).
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
		}
		// Unpin drops the pin's reference; the link goes when our handle
		// closes too.
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
		}
		l.Close()
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.RemoveAll(pinDir); err != nil {
		return fmt.Errorf("remove pins in %s: %w", pinDir, err)
	}
	return nil
}

func dirExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

func randHex() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

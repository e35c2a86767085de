package redirector

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/cgroup2"
)

// ReadStatus reads the pinned maps and links under pinDir.
func ReadStatus(pinDir string) (Status, error) {
	st := Status{PinDir: pinDir}
	// Maps are pinned by name (LIBBPF_PIN_BY_NAME), so a map's pin is its
	// name as bpf2go generated it.
	routes, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.RedirectMapTetherRoutes), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return st, fmt.Errorf("open pinned route map in %s (is the redirector installed?): %w", pinDir, permissionHint(err))
	}
	defer routes.Close()
	keys, err := kernelRouteMap{routes}.Keys()
	if err != nil {
		return st, fmt.Errorf("count routes: %w", err)
	}
	st.Routes = len(keys)
	st.Capacity = routes.MaxEntries()
	counters, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.RedirectMapTetherCounters), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return st, fmt.Errorf("open pinned counters: %w", err)
	}
	defer counters.Close()
	if st.Counters, err = Counters(counters); err != nil {
		return st, err
	}
	if err := readWriteState(pinDir, &st); err != nil {
		return st, err
	}
	st.Daemon = daemonStatus(st.Writes)
	if err := readIntentCounters(pinDir, st.Counters); err != nil {
		return st, err
	}
	if st.Health, err = readHealthStatus(pinDir); err != nil {
		return st, err
	}
	st.Programs = []ProgramStatus{}
	for _, h := range allHooks() {
		l, err := link.LoadPinnedLink(filepath.Join(pinDir, h.name), nil)
		if err != nil {
			continue
		}
		st.Links = append(st.Links, h.name)
		if info, err := l.Info(); err == nil {
			ps := ProgramStatus{Link: h.name, LinkID: uint32(info.ID), ProgramID: uint32(info.Program)}
			if cg := info.Cgroup(); cg != nil {
				ps.CgroupID = cg.CgroupId
			}
			st.Programs = append(st.Programs, ps)
		}
		l.Close()
	}
	st.Cgroup = cgroupOfLinks(st.Programs)
	return st, nil
}

// cgroupOfLinks is the path of the cgroup the links are attached to: the
// directory under the cgroup2 mount whose inode number is the cgroup id
// the kernel reports. "" when the links report none or it is not found
// (a status run in another cgroup namespace or mount). When links name
// several cgroups (something other than tether attached them), the first.
func cgroupOfLinks(progs []ProgramStatus) string {
	var id uint64
	for _, p := range progs {
		if p.CgroupID != 0 {
			id = p.CgroupID
			break
		}
	}
	if id == 0 {
		return ""
	}
	mnt, err := cgroup2.Mount()
	if err != nil {
		return ""
	}
	found := ""
	_ = filepath.WalkDir(mnt, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // unreadable or not a cgroup: skip
		}
		var st unix.Stat_t
		if unix.Stat(path, &st) == nil && st.Ino == id {
			found = path
			return fs.SkipAll
		}
		return nil
	})
	return found
}

// readWriteState fills st.Writes and st.Deadlines from their pinned maps;
// an installation by an older version has neither, which is no error.
func readWriteState(pinDir string, st *Status) error {
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	if m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.RedirectMapTetherRedirectorState), ro); err == nil {
		defer m.Close()
		if st.Writes, err = readStateMap(m); err != nil {
			return err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned redirector state: %w", err)
	}
	if m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.RedirectMapTetherPsDeadline), ro); err == nil {
		defer m.Close()
		if st.Deadlines, err = readDeadlines(m); err != nil {
			return fmt.Errorf("read PS deadlines: %w", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned PS deadlines: %w", err)
	}
	return nil
}

// readIntentCounters adds the intent program's counters (SYNs that carried
// the intent option, and redirected SYNs without room for it) to out; an
// installation without the intent program has none, which is no error.
func readIntentCounters(pinDir string, out map[string]uint64) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.IntentMapTetherIntentCounters), &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned intent counters: %w", err)
	}
	defer m.Close()
	for c, name := range map[bpf.IntentIntentCounter]string{bpf.IntentIntentCounterINTENT_WRITTEN: "intent_written", bpf.IntentIntentCounterINTENT_NO_ROOM: "intent_no_room"} {
		sum, err := readCounter(m, c)
		if err != nil {
			return err
		}
		out[name] = sum
	}
	return nil
}

// Counters reads the per-CPU counters, summed over CPUs, by name.
func Counters(m *ebpf.Map) (map[string]uint64, error) {
	out := map[string]uint64{}
	for i := bpf.RedirectCounter(0); i < bpf.RedirectCounterCOUNTER_MAX; i++ {
		sum, err := readCounter(m, i)
		if err != nil {
			return nil, err
		}
		out[counterName(i)] = sum
	}
	return out, nil
}

// readCounter reads counter k of a per-CPU counter array (the redirect
// object's or the intent object's), summed over CPUs.
func readCounter[K ~uint32](m *ebpf.Map, c K) (uint64, error) {
	var per []uint64
	k := uint32(c)
	if err := m.Lookup(&k, &per); err != nil {
		return 0, fmt.Errorf("read counter %d: %w", k, err)
	}
	var sum uint64
	for _, v := range per {
		sum += v
	}
	return sum, nil
}

// counterName is the name a counter has in Status and in metrics.
func counterName(c bpf.RedirectCounter) string {
	switch c {
	case bpf.RedirectCounterCOUNTER_REDIRECTED:
		return "redirected"
	case bpf.RedirectCounterCOUNTER_NO_ROUTE:
		return "no_route"
	case bpf.RedirectCounterCOUNTER_NO_BACKEND:
		return "no_live_backend"
	case bpf.RedirectCounterCOUNTER_PEER_REWRITTEN:
		return "getpeername_rewritten"
	case bpf.RedirectCounterCOUNTER_DESTROYED:
		return "sockets_destroyed"
	}
	return fmt.Sprintf("counter_%d", c)
}

package redirector

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/bpf"
)

// Passive health (bpf/health.c, bpf/health.h): a sockops program marks a
// backend suspect when a redirected connect to it is refused (RST to the
// SYN) or gets no SYN-ACK within the first RTO, and connect4/6 avoid
// suspect backends for the hold-down while another usable backend is
// unmarked. All of it happens in the kernel, on the first failure, before
// any control-plane message can say that a PS died; this file loads the
// program, writes its hold-down and reads its state.

// healthHook is the sockops program of passive health. Like intentHook it
// is an object of its own, sharing the pinned tether_orig_dst and the
// health maps with the redirect object.
var healthHook = hook{name: "link_health", attach: ebpf.AttachCGroupSockOps}

// maxSuspectsShown bounds the list `tether redirector status` prints: a
// whole PS gone marks every one of its backends that clients tried.
const maxSuspectsShown = 20

// loadHealth loads bpf/health.c against the maps pinned in dir (the
// redirect object pinned them first) and attaches it to cgroup, or swaps
// it into the pinned link.
func (in *Installation) loadHealth(dir, cgroup string) error {
	spec, err := bpf.LoadHealth()
	if err != nil {
		return fmt.Errorf("load passive health eBPF spec: %w", err)
	}
	if err := spec.LoadAndAssign(&in.health, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load passive health sockops program (verifier; needs bpf_skc_to_tcp_sock in sockops and kernel BTF): %+v", ve)
		}
		return permissionHint(fmt.Errorf("load passive health sockops program: %w", err))
	}
	return attachOrUpdate(dir, cgroup, healthHook, in.health.TetherHealth)
}

// SetSuspectHold writes the hold-down the programs read (0 turns passive
// health off: no backend is marked or avoided). The value lives in a
// pinned map, so it outlives this process like the programs do; a plain
// Install leaves what was there (nothing, on a first install: off).
func (in *Installation) SetSuspectHold(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("suspect hold-down %v is negative", d)
	}
	k, v := uint32(bpf.HealthHealthConfigSlotHEALTH_CFG_HOLD_NS), uint64(d)
	if err := in.objs.TetherHealthConfig.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write the suspect hold-down into the pinned health config: %w", err)
	}
	return nil
}

// healthCounterNames names the program's counters in status and metrics.
var healthCounterNames = map[bpf.HealthHealthCounter]string{
	bpf.HealthHealthCounterHEALTH_MARKED_REFUSED: "marked_refused",
	bpf.HealthHealthCounterHEALTH_MARKED_TIMEOUT: "marked_timeout",
	bpf.HealthHealthCounterHEALTH_CLEARED:        "cleared",
	bpf.HealthHealthCounterHEALTH_AVOIDED:        "avoided",
	bpf.HealthHealthCounterHEALTH_RETRIED:        "retried_after_hold",
}

// healthCounters reads the per-CPU health counters, summed, by name.
func healthCounters(m *ebpf.Map) (map[string]uint64, error) {
	out := make(map[string]uint64, len(healthCounterNames))
	for c, name := range healthCounterNames {
		sum, err := readCounter(m, c)
		if err != nil {
			return nil, fmt.Errorf("read passive health counter %s: %w", name, err)
		}
		out[name] = sum
	}
	return out, nil
}

// readHealthStatus reads passive health from the pins; an installation by
// a version without it has none of its maps, which is no error (nil).
func readHealthStatus(pinDir string) (*HealthStatus, error) {
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	open := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), ro)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open pinned %s: %w", name, err)
		}
		return m, nil
	}
	cfg, err := open(bpf.HealthMapTetherHealthConfig)
	if err != nil || cfg == nil {
		return nil, err
	}
	defer cfg.Close()
	var hold uint64
	if err := cfg.Lookup(uint32(bpf.HealthHealthConfigSlotHEALTH_CFG_HOLD_NS), &hold); err != nil {
		return nil, fmt.Errorf("read the suspect hold-down: %w", err)
	}
	st := &HealthStatus{Hold: "off"}
	if hold > 0 {
		st.Hold = time.Duration(hold).String()
	}
	if m, err := open(bpf.HealthMapTetherHealthCounters); err != nil {
		return nil, err
	} else if m != nil {
		defer m.Close()
		if st.Counters, err = healthCounters(m); err != nil {
			return nil, err
		}
	}
	m, err := open(bpf.HealthMapTetherSuspect)
	if err != nil {
		return nil, err
	}
	if m != nil {
		defer m.Close()
		if err := readSuspects(m, hold, st); err != nil {
			return nil, fmt.Errorf("read the suspect map: %w", err)
		}
	}
	return st, nil
}

// readSuspects fills st's counts and its newest maxSuspectsShown suspects.
func readSuspects(m *ebpf.Map, hold uint64, st *HealthStatus) error {
	now := uint64(monotonicNow())
	var (
		k   bpf.RedirectRouteKey
		at  uint64
		all []SuspectBackend
	)
	it := m.Iterate()
	for it.Next(&k, &at) {
		within := hold > 0 && (at >= now || now-at < hold)
		if within {
			st.Avoided++
		}
		age := 0.0
		if now > at {
			age = time.Duration(now - at).Seconds()
		}
		all = append(all, SuspectBackend{Backend: DecodeKey(k).String(), MarkedSecondsAgo: age, WithinHoldDown: within})
	}
	if err := it.Err(); err != nil {
		return err
	}
	st.Marked = len(all)
	sort.Slice(all, func(i, j int) bool { return all[i].MarkedSecondsAgo < all[j].MarkedSecondsAgo })
	if len(all) > maxSuspectsShown {
		all = all[:maxSuspectsShown]
	}
	st.Suspects = all
	return nil
}

// healthCollector exports passive health: its counters, and the backends
// marked suspect now, within the hold-down.
type healthCollector struct {
	in               *Installation
	events, suspects *prometheus.Desc
}

func newHealthCollector(in *Installation) *healthCollector {
	return &healthCollector{in: in,
		events: prometheus.NewDesc("tether_redirector_passive_health_total",
			"Passive health events counted by the eBPF programs, by kind (marked_refused, marked_timeout, cleared, avoided, retried_after_hold).", []string{"kind"}, nil),
		suspects: prometheus.NewDesc("tether_redirector_suspect_backends",
			"Backends marked suspect within the hold-down: connects avoid them while another backend is unmarked.", nil, nil),
	}
}

func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.events
	ch <- c.suspects
}

func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := healthCounters(c.in.objs.TetherHealthCounters)
	if err != nil {
		// Every kind exists from the start; an unreadable map reads as 0
		// rather than making the series vanish.
		counters = map[string]uint64{}
	}
	for _, name := range healthCounterNames {
		ch <- prometheus.MustNewConstMetric(c.events, prometheus.CounterValue, float64(counters[name]), name)
	}
	var hold uint64
	_ = c.in.objs.TetherHealthConfig.Lookup(uint32(bpf.HealthHealthConfigSlotHEALTH_CFG_HOLD_NS), &hold)
	var st HealthStatus
	_ = readSuspects(c.in.objs.TetherSuspect, hold, &st)
	ch <- prometheus.MustNewConstMetric(c.suspects, prometheus.GaugeValue, float64(st.Avoided))
}

package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/jitter"
)

// BackendState is a backend as a reader acts on it: where to connect, and
// whether new connections may go there now.
type BackendState struct {
	PSID     string
	Address  netip.AddrPort
	AgentID  string
	Live     bool
	Draining bool
}

// RouteState is the desired state of one target. A RouteState without
// backends means the target has no route any more.
type RouteState struct {
	Target   netip.AddrPort
	Backends []BackendState
}

// Sink receives the desired state from a Mirror. Calls come from one
// goroutine, in order.
type Sink interface {
	// Replace sets the complete desired state: every target not in routes
	// must go. It is called after every full load.
	Replace(ctx context.Context, routes []RouteState) error
	// Update applies routes that changed; one without backends is deleted.
	Update(ctx context.Context, routes []RouteState) error
}

// MirrorConfig configures a Mirror.
type MirrorConfig struct {
	Registry *Registry
	// Sink, when set, receives every change of the desired state.
	Sink Sink
	// Resync is the anti-entropy period: a full snapshot is loaded this often
	// even when the change feed looks healthy. Default 30s.
	Resync time.Duration
	// Logger receives the mirror's warnings and errors; nil discards them.
	Logger *slog.Logger
	// Metrics, when set, receives the mirror's metrics.
	Metrics prometheus.Registerer
	// Now is the clock; default the Registry's (Config.Now). Lease expiries
	// are converted to the Registry's clock when read (see
	// PSLease.ExpiresAt), so a Now given here must read that same clock.
	Now func() time.Time
}

// Mirror keeps an in-memory copy of the registry for a reader: full load,
// then the change feed, local lease expiry, and periodic anti-entropy. It
// serves lookups (Lookup) and pushes the desired state to a Sink.
type Mirror struct {
	cfg MirrorConfig
	log *slog.Logger
	now func() time.Time

	mu      sync.RWMutex
	entries map[netip.AddrPort][]psEntry // target -> its entries, by PS id
	leases  map[string]PSLease
	byPS    map[string]map[netip.AddrPort]struct{}
	// entryCount is how many entries (backends) entries holds in all.
	entryCount int
	// names interns the PS and agent ids of entries (see internLocked);
	// each full load starts it afresh.
	names map[string]string
	// seen is what the sink was last told about each PS's backends; only a
	// change of it (not a mere renewal) makes the mirror touch that PS's routes.
	seen map[string]psView

	// judge is the clock leases are judged on: it stands still while the
	// registry is out of sight (see leaseJudge).
	judge *leaseJudge

	ready     chan struct{}
	readyOnce sync.Once
	metrics   mirrorMetrics
}

const (
	// minRepairWindow bounds the repair window after a data loss from
	// below: writers republish within one renewal, but a few seconds cost
	// little and cover a slow PS.
	minRepairWindow = 5 * time.Second
)

// psView is the part of a PS lease that changes what readers do.
type psView struct {
	addr     netip.Addr
	addrs    string // see addrSetKey
	live     bool
	draining bool
}

type mirrorMetrics struct {
	routes      prometheus.Gauge
	fullLoads   prometheus.Counter
	changes     prometheus.Counter
	errors      *prometheus.CounterVec
	lastLoadDur prometheus.Gauge
	expired     prometheus.Counter
	reachable   prometheus.Gauge
	outages     prometheus.Counter
	dataLoss    prometheus.Counter
	judgeLag    prometheus.GaugeFunc
}

// NewMirror checks cfg and returns a Mirror; Run starts it.
func NewMirror(cfg MirrorConfig) (*Mirror, error) {
	if cfg.Registry == nil {
		return nil, errors.New("mirror: a registry is required")
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = cfg.Registry.now
	}
	m := &Mirror{
		cfg: cfg, log: cfg.Logger, now: cfg.Now,
		entries: map[netip.AddrPort][]psEntry{},
		names:   map[string]string{},
		leases:  map[string]PSLease{},
		byPS:    map[string]map[netip.AddrPort]struct{}{},
		seen:    map[string]psView{},
		ready:   make(chan struct{}),
		judge:   newLeaseJudge(cfg.Now),
	}
	m.metrics = mirrorMetrics{
		routes:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_mirror_routes", Help: "Targets known to the mirror."}),
		fullLoads:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_mirror_full_loads_total", Help: "Full snapshots loaded (start, anti-entropy, lost cursor)."}),
		changes:     prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_mirror_changes_total", Help: "Change feed entries applied."}),
		errors:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_mirror_errors_total", Help: "Errors by operation."}, []string{"op"}),
		lastLoadDur: prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_mirror_last_full_load_seconds", Help: "Duration of the last full load, sink included."}),
		expired:     prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_mirror_lease_expiries_total", Help: "PS leases the mirror saw lapse locally."}),
		reachable:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_mirror_registry_reachable", Help: "1 while the mirror's last registry call succeeded, 0 during an outage (backends are then kept as they are)."}),
		outages:     prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_mirror_registry_outages_total", Help: "Times the registry became unreachable for the mirror."}),
		dataLoss:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_mirror_data_loss_total", Help: "Times the mirror saw the registry lose data (generation changed, change feed reset)."}),
	}
	m.metrics.judgeLag = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tether_mirror_lease_clock_lag_seconds", Help: "How far the clock leases are judged on trails real time: it stands still while the registry is out of sight."},
		func() float64 { _, lag := m.judge.state(); return lag.Seconds() })
	// Every operation that can fail is exported from the start, at zero.
	for _, op := range []string{"snapshot", "generation", "read_changes", "refresh", "sink"} {
		m.metrics.errors.WithLabelValues(op)
	}
	if cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{m.metrics.routes, m.metrics.fullLoads, m.metrics.changes, m.metrics.errors, m.metrics.lastLoadDur, m.metrics.expired,
			m.metrics.reachable, m.metrics.outages, m.metrics.dataLoss, m.metrics.judgeLag} {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("register mirror metrics: %w", err)
			}
		}
	}
	return m, nil
}

// Ready is closed once the first full load has reached the sink.
func (m *Mirror) Ready() <-chan struct{} { return m.ready }

// Lookup returns the target's backends with their state at this moment
// (a lapsed lease is dead here even before the mirror's timer fires), in a
// stable order. ok is false when the target has no route. Leases are
// judged on the mirror's lease clock, which stands still while the
// registry is unreachable: an outage never turns a backend dead here.
func (m *Mirror) Lookup(target netip.AddrPort) (backends []BackendState, ok bool) {
	now := m.judge.Now()
	m.mu.RLock()
	defer m.mu.RUnlock()
	rs := m.viewLocked(target, now)
	return rs.Backends, len(rs.Backends) > 0
}

// Len returns the number of targets with at least one backend.
func (m *Mirror) Len() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.entries)
}

// message is what the feed reader hands to the applying loop.
type message struct {
	snapshot *Snapshot
	routes   []Route
	leases   map[string]PSLease
	gone     []string
	changes  int
	// changedAt is when the oldest of the changes was written (its feed
	// entry id's time), for ChangeTime.
	changedAt time.Time
	started   time.Time
	// merge is set during a repair window after a data loss: what the
	// message holds is added, and nothing is removed for being absent.
	merge bool
}

// Run loads, follows and repairs the mirror until ctx ends. Redis being
// unreachable is not an error: the mirror keeps serving what it has, with
// every backend as it was (leases are judged on a clock that stands still
// meanwhile, see leaseJudge), and catches up when Redis answers again.
func (m *Mirror) Run(ctx context.Context) error {
	msgs := make(chan message)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		m.follow(ctx, msgs)
	}()
	defer func() { <-readerDone }()

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case msg := <-msgs:
			if err := m.apply(ctx, msg); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				m.metrics.errors.WithLabelValues("sink").Inc()
				m.log.Error("applying registry state failed; the next full load repairs it", "err", err)
			}
		case <-timer.C:
			if err := m.expire(ctx); err != nil && ctx.Err() == nil {
				m.metrics.errors.WithLabelValues("sink").Inc()
				m.log.Error("marking lapsed leases dead failed", "err", err)
			}
		}
		timer.Reset(m.nextExpiry())
	}
}

// follow reads the registry: a snapshot, then the change feed, a new
// snapshot every Resync or when the feed cannot be followed. It checks the
// registry's generation on every round, so a data loss is seen within one
// feed read. It never returns before ctx ends.
func (m *Mirror) follow(ctx context.Context, msgs chan<- message) {
	reg := m.cfg.Registry
	var cursor, gen string
	var lastFull time.Time
	// repairUntil is the end of the repair window after a data loss (zero
	// outside one): until then the mirror merges what it reads.
	var repairUntil time.Time
	// outageSince is when the current outage began (zero while reachable).
	var outageSince time.Time
	backoff := 100 * time.Millisecond
	failed := func(op string, err error) {
		m.metrics.errors.WithLabelValues(op).Inc()
		if outageSince.IsZero() {
			outageSince = m.now()
			m.metrics.reachable.Set(0)
			m.metrics.outages.Inc()
			m.log.Warn("registry unreachable: keeping every backend as it is until it returns", "op", op, "err", err)
		} else {
			m.log.Debug("registry still unreachable", "op", op, "err", err, "retry_in", backoff)
		}
		sleep(ctx, backoff)
		backoff = min(backoff*2, 5*time.Second)
	}
	reached := func() {
		gap := m.judge.contact()
		if !outageSince.IsZero() {
			m.log.Info("registry reachable again: lease expiry resumes", "outage", m.now().Sub(outageSince).Round(time.Millisecond),
				"blind_for", gap.Round(time.Millisecond))
			outageSince = time.Time{}
		}
		m.metrics.reachable.Set(1)
		backoff = 100 * time.Millisecond
	}
	dataLost := func(reason string) {
		m.metrics.dataLoss.Inc()
		window := max(2*m.judge.longest(), minRepairWindow)
		m.log.Warn("registry lost data: merging what it holds while its writers republish; nothing is removed for being absent",
			"reason", reason, "repair_window", window)
		repairUntil = m.now().Add(window)
		cursor = ""
	}
	for ctx.Err() == nil {
		if !repairUntil.IsZero() && !m.now().Before(repairUntil) {
			repairUntil = time.Time{}
			cursor = ""
			m.log.Info("registry repair window over: loading it in full")
		}
		if cursor == "" || m.now().Sub(lastFull) >= m.cfg.Resync {
			start := m.now()
			snap, err := reg.Snapshot(ctx)
			if err != nil {
				failed("snapshot", err)
				continue
			}
			reached()
			if gen != "" && snap.Generation != gen {
				dataLost(fmt.Sprintf("generation changed from %q to %q", gen, snap.Generation))
			}
			gen = snap.Generation
			if !send(ctx, msgs, message{snapshot: &snap, started: start, merge: !repairUntil.IsZero()}) {
				return
			}
			cursor, lastFull = snap.Cursor, m.now()
			continue
		}
		g, err := reg.Generation(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failed("generation", err)
			continue
		}
		reached()
		if g != gen {
			old := gen
			gen = g
			if old != "" {
				// Gone or replaced: either way the data it marked is gone.
				dataLost(fmt.Sprintf("generation changed from %q to %q", old, g))
				continue
			}
			// The first generation in a registry that had none (new, or
			// already known to be repairing): nothing was lost.
		}
		// The read returns within the block time even when nothing
		// changed: that return is the contact the lease clock runs on.
		wait := min(m.judge.block(), m.cfg.Resync-m.now().Sub(lastFull))
		changes, err := reg.ReadChanges(ctx, cursor, 1000, max(wait, time.Millisecond))
		if errors.Is(err, ErrFeedReset) {
			reached()
			dataLost(err.Error())
			continue
		}
		if errors.Is(err, ErrCursorLost) {
			reached()
			m.log.Info("change feed cursor lost, loading a full snapshot", "reason", err)
			cursor = ""
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failed("read_changes", err)
			continue
		}
		reached()
		if len(changes) == 0 {
			continue
		}
		routes, leases, gone, err := reg.Refresh(ctx, changes)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failed("refresh", err)
			continue
		}
		reached()
		if !send(ctx, msgs, message{routes: routes, leases: leases, gone: gone, changes: len(changes), changedAt: streamIDTime(changes[0].Cursor), merge: !repairUntil.IsZero()}) {
			return
		}
		cursor = changes[len(changes)-1].Cursor
	}
}

func send(ctx context.Context, ch chan<- message, msg message) bool {
	select {
	case ch <- msg:
		return true
	case <-ctx.Done():
		return false
	}
}

func sleep(ctx context.Context, d time.Duration) {
	// Jitter keeps many readers from hammering a Redis that just came back
	// all in the same instant.
	d = jitter.Spread(d*3/4, 1.0/3)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

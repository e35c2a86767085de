package redirector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/registry"
)

// Redirector is the daemon: it installs the programs, then keeps the route
// map in sync with the registry until its context ends. Stopping it leaves
// the programs attached and the maps pinned: redirection goes on with the
// last known routes until the next start (or `redirector uninstall`).
type Redirector struct {
	cfg    Config
	log    *slog.Logger
	in     *Installation
	reg    *registry.Registry
	mirror *registry.Mirror
	rec    *Reconciler
	dl     *psDeadlines
	// synced is the mirror's sink: the reconciler, timing its successes.
	synced *syncTracked

	destroyer socketDestroyer
}

// New installs (or re-uses) the eBPF programs and prepares the sync.
func New(cfg Config) (*Redirector, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	targets, err := cfg.targets()
	if err != nil {
		return nil, err
	}
	cg, err := ResolveCgroup(cfg.Cgroup)
	if err != nil {
		return nil, err
	}
	if IsRootCgroup(cg) {
		log.Warn("--cgroup names the root of the cgroup2 mount: every process of the host is redirected (the redirector's own connections excepted)", "cgroup", cg)
	}
	in, err := Install(cfg.PinDir, cg, uint32(cfg.MapSize))
	if err != nil {
		return nil, err
	}
	if err := in.SetSuspectHold(cfg.SuspectHold); err != nil {
		in.Close()
		return nil, err
	}
	if in.Updated {
		log.Info("re-used pinned maps and swapped programs on the pinned links", "pin_dir", cfg.PinDir, "cgroup", cg)
	} else {
		log.Info("installed eBPF programs", "pin_dir", cfg.PinDir, "cgroup", cg)
	}
	reg, err := registry.New(registryConfig(cfg, log, in))
	if err != nil {
		in.Close()
		return nil, err
	}
	destroyer := newDestroyer(cfg.PinDir, cfg.forceNetlinkDestroy, log)
	rec := NewReconciler(NewKernelRouteMap(in.objs.TetherRoutes), destroyer, log, WithTargets(targets))
	synced := &syncTracked{Reconciler: rec}
	mirror, err := registry.NewMirror(registry.MirrorConfig{
		Registry: reg, Sink: synced, Resync: cfg.Resync, Logger: log, Metrics: cfg.Registerer,
	})
	if err != nil {
		destroyer.Close()
		reg.Close()
		in.Close()
		return nil, err
	}
	dl := &psDeadlines{m: in.objs.TetherPsDeadline, reg: reg, grace: cfg.KernelGrace, log: log, synced: mirror.Ready()}
	r := &Redirector{cfg: cfg, log: log, in: in, reg: reg, mirror: mirror, rec: rec, dl: dl, synced: synced, destroyer: destroyer}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(r.collector()); err != nil {
			r.Close()
			return nil, fmt.Errorf("register redirector metrics: %w", err)
		}
		if err := cfg.Registerer.Register(newHealthCollector(in)); err != nil {
			r.Close()
			return nil, fmt.Errorf("register passive health metrics: %w", err)
		}
		if err := cfg.Registerer.Register(rec.ChangeLatency()); err != nil {
			r.Close()
			return nil, fmt.Errorf("register change-to-map latency: %w", err)
		}
	}
	return r, nil
}

// registryConfig is the config of the redirector's registry client. Every
// Redis socket it opens must be marked with in.MarkOwnSocket before it
// connects, so the redirector's programs never redirect it.
func registryConfig(cfg Config, log *slog.Logger, in *Installation) registry.Config {
	return registry.Config{URL: cfg.Redis, Prefix: cfg.RedisPrefix, Logger: log, Control: in.MarkOwnSocket}
}

// Ready is closed once the first full load has reached the map.
func (r *Redirector) Ready() <-chan struct{} { return r.mirror.Ready() }

// Run keeps the map in sync until ctx ends: the mirror's changes, the
// retries of failed writes, the PS deadlines, and the state for status.
func (r *Redirector) Run(ctx context.Context) error {
	stopping := context.AfterFunc(ctx, func() {
		r.log.Info("redirector stopping: the programs stay attached and keep redirecting with the pinned routes until the next start",
			"pin_dir", r.cfg.PinDir, "kernel_grace", r.cfg.KernelGrace)
	})
	defer stopping()
	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return r.mirror.Run(ctx) })
	eg.Go(func() error { r.rec.RunRetries(ctx); return nil })
	eg.Go(func() error { r.dl.run(ctx); return nil })
	eg.Go(func() error { r.storeState(ctx); return nil })
	eg.Go(func() error {
		select {
		case <-r.mirror.Ready():
			r.log.Info("route map in sync with the registry", "routes", r.rec.Entries(), "routes_not_written", r.rec.State().Pending)
		case <-ctx.Done():
		}
		return nil
	})
	return eg.Wait()
}

// Health is nil while every route is in the kernel map and the PS
// deadlines are refreshed; it serves /healthz.
func (r *Redirector) Health() error {
	return errors.Join(r.rec.Health(), r.dl.healthy())
}

// syncTracked is the mirror's sink: the reconciler (embedded, so every
// method of it stays reachable), remembering when a full load or a change
// last reached the kernel map without error.
type syncTracked struct {
	*Reconciler
	last atomic.Int64 // unix nanoseconds; zero before the first
}

func (s *syncTracked) Replace(ctx context.Context, routes []registry.RouteState) error {
	err := s.Reconciler.Replace(ctx, routes)
	if err == nil {
		s.last.Store(time.Now().UnixNano())
	}
	return err
}

func (s *syncTracked) Update(ctx context.Context, routes []registry.RouteState) error {
	err := s.Reconciler.Update(ctx, routes)
	if err == nil {
		s.last.Store(time.Now().UnixNano())
	}
	return err
}

// LastSync is when registry state last reached the kernel map without
// error (a full load or a change); zero before the first.
func (r *Redirector) LastSync() time.Time {
	if ns := r.synced.last.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// syncBound is how old the last successful sync may be for the redirector
// to count as ready: a full load runs every --resync even when nothing
// changes, so two periods without one (plus slack for a slow load) mean
// the registry is out of reach or the map refuses writes. The kernel keeps
// redirecting meanwhile; readiness only says the map may be stale.
func (r *Redirector) syncBound() time.Duration { return 2*r.cfg.Resync + 10*time.Second }

// Readiness is nil while the redirector does its job: its programs' links
// are pinned (attached; `redirector uninstall` removes them), the first
// full load of the registry reached the kernel map, and a sync succeeded
// within syncBound. Otherwise it says every reason.
func (r *Redirector) Readiness() error {
	var errs []error
	for _, h := range append(hooks[:len(hooks):len(hooks)], intentHook) {
		if _, err := os.Stat(filepath.Join(r.cfg.PinDir, h.name)); err != nil {
			errs = append(errs, fmt.Errorf("program link %s not pinned in %s (detached?): %w", h.name, r.cfg.PinDir, err))
		}
	}
	select {
	case <-r.mirror.Ready():
		if last := r.LastSync(); last.IsZero() {
			errs = append(errs, errors.New("no sync of the route map has succeeded yet"))
		} else if since := time.Since(last); since > r.syncBound() {
			errs = append(errs, fmt.Errorf("route map last synced %v ago (bound %v): registry out of reach or map writes failing",
				since.Round(time.Second), r.syncBound()))
		}
	default:
		errs = append(errs, errors.New("first full load of the registry not in the route map yet"))
	}
	return errors.Join(errs...)
}

// storeState writes the write state into the pinned state map every
// second, for `tether redirector status`.
func (r *Redirector) storeState(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	logged := false
	for {
		err := writeStateMap(r.in.objs.TetherRedirectorState, r.rec.State(), r.cfg.KernelGrace)
		if err != nil && !logged {
			r.log.Warn("cannot store the route map state for `tether redirector status`", "err", err)
		}
		logged = err != nil
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Close releases handles; pins and attachments stay.
func (r *Redirector) Close() error {
	r.destroyer.Close()
	r.reg.Close()
	return r.in.Close()
}

// collector exports the kernel counters and the map size as metrics.
func (r *Redirector) collector() prometheus.Collector {
	return &kernelCollector{r: r,
		counters: prometheus.NewDesc("tether_redirector_bpf_events_total", "Events counted by the eBPF programs, by kind.", []string{"kind"}, nil),
		routes:   prometheus.NewDesc("tether_redirector_routes", "Routes in the kernel route map.", nil, nil),
		skipped: prometheus.NewDesc("tether_redirector_routes_skipped_total",
			"Route targets kept out of the kernel map, by reason (not_ipv4, target_not_allowed); each target counts once.", []string{"reason"}, nil),
		full: prometheus.NewDesc("tether_redirector_map_full",
			"1 while routes are left out of the kernel route map because it is full (raise --map-size), else 0.", nil, nil),
		pending: prometheus.NewDesc("tether_redirector_routes_not_written",
			"Routes the kernel map should hold and does not (failed writes, retried); their clients' connects are not redirected.", nil, nil),
		writeErrs: prometheus.NewDesc("tether_redirector_route_write_errors_total",
			"Failed route map writes, by reason (map_full, other).", []string{"reason"}, nil),
		dlErrs: prometheus.NewDesc("tether_redirector_deadline_refresh_errors_total",
			"Failed refreshes of the PS deadlines in the kernel map.", nil, nil),
	}
}

type kernelCollector struct {
	r                                *Redirector
	counters, routes, skipped        *prometheus.Desc
	full, pending, writeErrs, dlErrs *prometheus.Desc
}

func (c *kernelCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.counters, c.routes, c.skipped, c.full, c.pending, c.writeErrs, c.dlErrs} {
		ch <- d
	}
}

func (c *kernelCollector) Collect(ch chan<- prometheus.Metric) {
	if m, err := Counters(c.r.in.objs.TetherCounters); err == nil {
		for k, v := range m {
			ch <- prometheus.MustNewConstMetric(c.counters, prometheus.CounterValue, float64(v), k)
		}
	}
	ch <- prometheus.MustNewConstMetric(c.routes, prometheus.GaugeValue, float64(c.r.rec.Entries()))
	for reason, n := range c.r.rec.Skipped() {
		ch <- prometheus.MustNewConstMetric(c.skipped, prometheus.CounterValue, float64(n), reason)
	}
	st := c.r.rec.State()
	ch <- prometheus.MustNewConstMetric(c.full, prometheus.GaugeValue, float64(b2u(st.Full)))
	ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(st.Pending))
	for reason, n := range st.Errors {
		ch <- prometheus.MustNewConstMetric(c.writeErrs, prometheus.CounterValue, float64(n), reason)
	}
	ch <- prometheus.MustNewConstMetric(c.dlErrs, prometheus.CounterValue, float64(c.r.dl.errors.Load()))
}

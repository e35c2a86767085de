package redirector

import (
	"context"
	"fmt"
	"log/slog"

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
	mirror, err := registry.NewMirror(registry.MirrorConfig{
		Registry: reg, Sink: rec, Resync: cfg.Resync, Logger: log, Metrics: cfg.Registerer,
	})
	if err != nil {
		destroyer.Close()
		reg.Close()
		in.Close()
		return nil, err
	}
	r := &Redirector{cfg: cfg, log: log, in: in, reg: reg, mirror: mirror, rec: rec, destroyer: destroyer}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(r.collector()); err != nil {
			r.Close()
			return nil, fmt.Errorf("register redirector metrics: %w", err)
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

// Run keeps the map in sync until ctx ends.
func (r *Redirector) Run(ctx context.Context) error {
	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return r.mirror.Run(ctx) })
	eg.Go(func() error {
		select {
		case <-r.mirror.Ready():
			r.log.Info("route map in sync with the registry", "routes", r.rec.Entries())
		case <-ctx.Done():
		}
		return nil
	})
	return eg.Wait()
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
	}
}

type kernelCollector struct {
	r        *Redirector
	counters *prometheus.Desc
	routes   *prometheus.Desc
	skipped  *prometheus.Desc
}

func (c *kernelCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.counters
	ch <- c.routes
	ch <- c.skipped
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
}

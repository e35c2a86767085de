package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/internal/buildinfo"
	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/daemon"
)

// runner is a long-running part of tether: ps, agent, redirector, proxy.
type runner interface {
	Run(ctx context.Context) error
	Close() error
}

// The optional faces of a runner, found by type assertion so that each
// daemon offers only what means something for it.
type (
	// healthReporter says the daemon works at all (/healthz).
	healthReporter interface{ Health() error }
	// readinessReporter says the daemon does its job now (/readyz): nil,
	// or every reason it does not.
	readinessReporter interface{ Readiness() error }
	// reloader re-reads what can change without a restart (SIGHUP) and
	// says what it did.
	reloader interface {
		Reload(ctx context.Context) (string, error)
	}
)

// validator is a daemon's typed config.
type validator interface{ Validate() error }

const (
	// watchdogPeriod and watchdogStall bound the process watchdog: a
	// goroutine beating every second that has not run for 15 s means the
	// runtime no longer schedules goroutines (or the machine is frozen).
	watchdogPeriod = time.Second
	watchdogStall  = 15 * time.Second
	// readyPoll is how often the daemon's readiness is checked for the
	// one "ready" log line.
	readyPoll = 200 * time.Millisecond
)

// runDaemon is the body every daemon command shares: resolve the config
// (defaults, file, env, flags), validate it, build the logger and the
// metrics registry, build the daemon, then run it beside the metrics server
// until the command's context ends (SIGINT/SIGTERM, see main.go). It logs
// the start (with the build), the first readiness and the stop, and turns
// SIGHUP into a reload (or a logged no-op): a daemon never dies of it.
func runDaemon(cmd *cobra.Command, g *globalFlags, cfg validator, metricsAddr *string,
	build func(log *slog.Logger, reg *prometheus.Registry) (runner, error)) error {
	// Claim SIGHUP first: its default action kills the process, and a
	// daemon must not die of a reload request arriving during its start.
	hangups := make(chan os.Signal, 1)
	signal.Notify(hangups, syscall.SIGHUP)
	defer signal.Stop(hangups)

	if err := cliconfig.Resolve(cmd.Flags(), g.config, cfg); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	log, err := g.logger(cmd)
	if err != nil {
		return err
	}
	role := cmd.Name()
	bi := buildinfo.Get()
	started := time.Now()
	reg := daemon.NewRegistry()
	reg.MustRegister(buildinfo.NewCollector(bi))
	r, err := build(log, reg)
	if err != nil {
		// One line, from main: a daemon that cannot start (bad settings,
		// missing credentials) says what and why once, and nothing else.
		return err
	}
	defer r.Close()
	log.Info("starting tether "+role, append([]any{"pid", os.Getpid()}, bi.LogAttrs()...)...)

	eg, ctx := errgroup.WithContext(cmd.Context())
	watchdog := daemon.NewWatchdog("process watchdog", watchdogStall)
	probes := daemon.Probes{Health: []func() error{watchdog.Check}}
	// A daemon that can tell it is unhealthy (the redirector with a full
	// route map, a PS whose lease loop stopped) makes /healthz say so.
	if h, ok := r.(healthReporter); ok {
		probes.Health = append(probes.Health, h.Health)
	}
	if rr, ok := r.(readinessReporter); ok {
		probes.Ready = rr.Readiness
	}
	eg.Go(func() error { watchdog.Tick(ctx, watchdogPeriod); return nil })
	eg.Go(func() error { return daemon.Serve(ctx, *metricsAddr, reg, log, nil, probes) })
	eg.Go(func() error { logReadyOnce(ctx, log, role, probes.Ready, started); return nil })
	eg.Go(func() error { handleHangups(ctx, log, role, r, hangups); return nil })
	eg.Go(func() error { return r.Run(ctx) })
	err = eg.Wait()
	attrs := []any{"uptime", time.Since(started).Round(time.Millisecond)}
	if err != nil {
		log.Error("tether "+role+" stopped", append(attrs, "err", err)...)
	} else {
		log.Info("tether "+role+" stopped", attrs...)
	}
	return err
}

// logReadyOnce logs "ready" the first time ready passes, so that an
// operator reading the log sees when the daemon started doing its job.
func logReadyOnce(ctx context.Context, log *slog.Logger, role string, ready func() error, started time.Time) {
	if ready == nil {
		return
	}
	t := time.NewTicker(readyPoll)
	defer t.Stop()
	for {
		if ready() == nil {
			log.Info("tether "+role+" ready", "after", time.Since(started).Round(time.Millisecond))
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// handleHangups reloads r on each SIGHUP, or logs that there is nothing to
// reload. A failed reload keeps what was loaded before: the daemon goes on
// as it was, and the log says why the new state was refused.
func handleHangups(ctx context.Context, log *slog.Logger, role string, r runner, hangups <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hangups:
		}
		rl, ok := r.(reloader)
		if !ok {
			log.Info("SIGHUP received: tether " + role + " has nothing to reload; ignored (restart it to apply new flags or config)")
			continue
		}
		what, err := rl.Reload(ctx)
		switch {
		case err != nil:
			log.Error("SIGHUP reload failed; keeping the previous state", "err", err)
		default:
			log.Info("SIGHUP: reloaded", "what", what)
		}
	}
}

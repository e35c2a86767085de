package main

import (
	"context"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/daemon"
)

// runner is a long-running part of tether: ps, agent, redirector, proxy.
type runner interface {
	Run(ctx context.Context) error
	Close() error
}

// validator is a daemon's typed config.
type validator interface{ Validate() error }

// runDaemon is the body every daemon command shares: resolve the config
// (defaults, file, env, flags), validate it, build the logger and the
// metrics registry, build the daemon, then run it beside the metrics server
// until the command's context ends (SIGINT/SIGTERM, see main.go).
func runDaemon(cmd *cobra.Command, g *globalFlags, cfg validator, metricsAddr *string,
	build func(log *slog.Logger, reg *prometheus.Registry) (runner, error)) error {
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
	reg := daemon.NewRegistry()
	r, err := build(log, reg)
	if err != nil {
		return err
	}
	defer r.Close()
	eg, ctx := errgroup.WithContext(cmd.Context())
	// A daemon that can tell it is unhealthy (the redirector with a full
	// route map) makes /healthz say so.
	var checks []func() error
	if h, ok := r.(interface{ Health() error }); ok {
		checks = append(checks, h.Health)
	}
	eg.Go(func() error { return daemon.ServeMetrics(ctx, *metricsAddr, reg, log, nil, checks...) })
	eg.Go(func() error { return r.Run(ctx) })
	return eg.Wait()
}

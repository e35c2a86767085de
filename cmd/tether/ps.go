package main

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/ps"
)

func newPSCmd(g *globalFlags) *cobra.Command {
	cfg := ps.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "ps --listen ADDR --advertise IP --ports LO-HI --redis URL --id ID",
		Short: "Run a proxy server: accept agents' tunnels and carry clients' connections to them",
		Long: `ps accepts agents' tunnels. For every endpoint an agent exposes it allocates a
port from --ports, listens on --advertise:port, publishes the route in Redis
under a lease it keeps renewing, and carries each connection to that port over
the agent's tunnel. Released ports are quarantined before reuse.

On SIGTERM it drains: marks itself draining, withdraws its routes, stops
accepting, waits up to --drain-timeout for connections in flight, then exits.

Agents authenticate with a token: --token-file holds one per line, each
optionally followed by the comma-separated CIDRs that token may expose
(without a file, the env TETHER_TOKEN holds a single token).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDaemon(cmd, g, &cfg, &cfg.Metrics, func(log *slog.Logger, reg *prometheus.Registry) (runner, error) {
				cfg.Logger = log
				cfg.Registerer = reg
				return ps.New(cfg)
			})
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	return cmd
}

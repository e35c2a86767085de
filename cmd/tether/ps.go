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

Every agent needs a credential; a PS with none refuses to start (--insecure
accepts anyone, for experiments only):
  --token-file  one "TOKEN AGENT_IDS [CIDRS]" per line: the agent ids (a comma
                list, '*' globs allowed: host-*) the token may act as, and
                the addresses its agents may expose (env TETHER_TOKEN may
                hold one such line instead of a file)
  --tls-ca      agents present a client certificate (see "tether certs"):
                its CN is the agent id, its IP SANs what it may expose
An agent whose credential lists no addresses may expose only the address its
tunnel comes from. Loopback, link-local and other special addresses need a
range in --agent-cidrs that names them; PS and registry addresses never pass.

--redis takes host:port or a redis://, rediss:// (TLS) or unix:// URL;
--redis-prefix must be the one the redirectors and proxies read.`,
		Example: `  tether ps --id ps1 --listen :7000 --advertise 10.0.0.21 --redis redis://10.0.0.5:6379/0 \
    --token-file /etc/tether/tokens
  # /etc/tether/tokens:
  #   9f2c...e1  host-*         10.1.0.0/16
  #   51ab...07  db-1,db-2`,
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

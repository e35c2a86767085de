package main

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/cliconfig"
)

func newAgentCmd(g *globalFlags) *cobra.Command {
	cfg := agent.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "agent --server HOST:PORT --id ID --expose SPEC",
		Short: "Run an agent: hold tunnels to proxy servers and expose local endpoints through them",
		Long: `agent dials the proxy servers (--server, repeatable; a name that resolves to
several addresses counts as several servers) and holds --tunnels tunnels on
distinct PS nodes, exposing every --expose endpoint through each. It
reconnects forever with exponential backoff and full jitter.

--expose PORT routes and dials IP:PORT; --expose PORT=HOST:PORT routes IP:PORT
and dials HOST:PORT. --ip defaults to the source address of the route towards
the first server. The token comes from --token-file or the env TETHER_TOKEN.`,
		Example: `  tether agent --server ps.example:7000 --id host-11 --expose 9100
  tether agent --server 198.18.0.10:7000 --id s --ip 198.18.3.5 --expose 8080=127.0.0.1:8080`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDaemon(cmd, g, &cfg, &cfg.Metrics, func(log *slog.Logger, reg *prometheus.Registry) (runner, error) {
				cfg.Logger = log
				cfg.Registerer = reg
				return agent.New(cfg)
			})
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	return cmd
}

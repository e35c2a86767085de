package main

import (
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/daemon"
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
			if err := cliconfig.Resolve(cmd.Flags(), g.config, &cfg); err != nil {
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
			cfg.Logger = log
			cfg.Registerer = reg
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			defer a.Close()
			eg, ctx := errgroup.WithContext(cmd.Context())
			eg.Go(func() error { return daemon.ServeMetrics(ctx, cfg.Metrics, reg, log, nil) })
			eg.Go(func() error { return a.Run(ctx) })
			return eg.Wait()
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	return cmd
}

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/registry"
)

// routesConfig is what the routes commands read: where the registry is.
type routesConfig struct {
	Redis  string `yaml:"redis" flag:"redis" usage:"Redis address of the route registry: host:port, or a redis://host:port/db, rediss:// or unix:// URL"`
	Prefix string `yaml:"redis-prefix" flag:"redis-prefix" usage:"key prefix (hash tag) of the registry in Redis"`
	Output string `yaml:"-"`
}

func newRoutesCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "routes",
		Short: "Inspect the route registry: which agent endpoints are reachable through which PS",
	}
	cmd.AddCommand(newRoutesListCmd(g), newRoutesGetCmd(g))
	return cmd
}

func bindRoutesFlags(cmd *cobra.Command) *routesConfig {
	cfg := &routesConfig{Redis: "redis://127.0.0.1:6379/0", Prefix: "tether", Output: "table"}
	cliconfig.Bind(cmd.Flags(), cfg)
	cmd.Flags().StringVarP(&cfg.Output, "output", "o", cfg.Output, "output format: table or json")
	return cfg
}

func (c *routesConfig) open(g *globalFlags, cmd *cobra.Command) (*registry.Registry, error) {
	if err := cliconfig.Resolve(cmd.Flags(), g.config, c); err != nil {
		return nil, err
	}
	if c.Output != "table" && c.Output != "json" {
		return nil, fmt.Errorf("output %q: want table or json", c.Output)
	}
	log, err := g.logger(cmd)
	if err != nil {
		return nil, err
	}
	return registry.New(registry.Config{URL: c.Redis, Prefix: c.Prefix, Logger: log})
}

func newRoutesListCmd(g *globalFlags) *cobra.Command {
	var cfg *routesConfig
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List every route that has a live backend",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			reg, err := cfg.open(g, cmd)
			if err != nil {
				return err
			}
			defer reg.Close()
			routes, err := reg.List(cmd.Context())
			if err != nil {
				return err
			}
			if cfg.Output == "json" {
				return writeJSON(cmd.OutOrStdout(), routes)
			}
			return writeRouteTable(cmd.OutOrStdout(), routes, time.Now())
		},
	}
	cfg = bindRoutesFlags(cmd)
	return cmd
}

func newRoutesGetCmd(g *globalFlags) *cobra.Command {
	var cfg *routesConfig
	cmd := &cobra.Command{
		Use:   "get IP:PORT",
		Short: "Show one target's live backends",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			target, err := netip.ParseAddrPort(args[0])
			if err != nil {
				return fmt.Errorf("target %q: want IP:PORT, e.g. 198.18.1.11:9100", args[0])
			}
			target = netip.AddrPortFrom(target.Addr().Unmap(), target.Port())
			reg, err := cfg.open(g, cmd)
			if err != nil {
				return err
			}
			defer reg.Close()
			rt, err := reg.Get(cmd.Context(), target)
			if errors.Is(err, registry.ErrNotFound) {
				return fmt.Errorf("no live route for %s", target)
			}
			if err != nil {
				return err
			}
			if cfg.Output == "json" {
				return writeJSON(cmd.OutOrStdout(), rt)
			}
			return writeRouteTable(cmd.OutOrStdout(), []registry.Route{rt}, time.Now())
		},
	}
	cfg = bindRoutesFlags(cmd)
	return cmd
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func writeRouteTable(w io.Writer, routes []registry.Route, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tPS\tADDRESS\tAGENT\tOWNER\tLEASE")
	for _, rt := range routes {
		for _, b := range rt.Backends {
			owner := b.Owner
			if owner == "" {
				owner = "-" // published without a credential, or by an older PS
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", rt.Target, b.PSID, b.Address, b.AgentID, owner, b.ExpiresAt.Sub(now).Round(100*time.Millisecond))
		}
	}
	return tw.Flush()
}

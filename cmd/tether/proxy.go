package main

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/proxy"
)

func newProxyCmd(g *globalFlags) *cobra.Command {
	cfg := proxy.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "proxy --redis URL [--socks ADDR] [--http ADDR]",
		Short: "Serve SOCKS5 and HTTP proxies that reach agents, for clients that cannot run eBPF",
		Long: `proxy looks each requested target up in the route registry, exactly as the
redirector does, and connects to one of its live PS backends (the other one if
the first refuses). SOCKS5 (RFC 1928: no-auth, or username/password when
--auth-file is set) supports CONNECT to IPv4, IPv6 and domain names; BIND and
UDP ASSOCIATE are answered "command not supported". The HTTP proxy supports
CONNECT tunnels and plain http:// forwarding. A target without a route is
refused (SOCKS5 "not allowed by ruleset", HTTP 403) unless --passthrough.`,
		Example: `  tether proxy --redis redis://10.0.0.5:6379/0 --socks 127.0.0.1:1080 --http 127.0.0.1:3128
  curl --socks5 127.0.0.1:1080 http://198.18.1.11:8080/`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDaemon(cmd, g, &cfg, &cfg.Metrics, func(log *slog.Logger, reg *prometheus.Registry) (runner, error) {
				cfg.Logger = log
				cfg.Registerer = reg
				return proxy.New(cfg)
			})
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	return cmd
}

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
CONNECT tunnels and plain http:// forwarding; anything else ("GET /",
"OPTIONS *", https:// URLs without CONNECT) is answered 400.

Secure by default:
  - A listener beyond loopback (0.0.0.0, ::, an empty host, a public address
    or a name other than localhost) refuses to start unless --auth-file or
    --allow-clients limits who may use it.
  - A target without a route is refused (SOCKS5 "not allowed by ruleset",
    HTTP 403) unless --passthrough. Passthrough never dials the proxy host's
    own addresses, nor loopback, link-local, unspecified, multicast or
    broadcast addresses unless a CIDR of --passthrough-cidrs lying inside
    their range names them (0.0.0.0/0 does not; 127.77.0.0/16 opens only
    that range). A name is resolved once; every address it has must pass,
    and the address checked is the one dialed. Refusals are counted in
    tether_proxy_passthrough_refused_total{reason}.
Routed targets are unaffected: they always go to their PS backends.

--redis takes host:port or a redis://, rediss:// (TLS) or unix:// URL.`,
		Example: `  tether proxy --redis redis://10.0.0.5:6379/0 --socks 127.0.0.1:1080 --http 127.0.0.1:3128
  curl --socks5 127.0.0.1:1080 http://198.18.1.11:8080/

  # shared by a subnet, with passwords, passthrough to one public range
  tether proxy --redis redis://10.0.0.5:6379/0 --socks 0.0.0.0:1080 \
    --allow-clients 10.1.0.0/16 --auth-file /etc/tether/proxy-users \
    --passthrough --passthrough-cidrs 203.0.113.0/24`,
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

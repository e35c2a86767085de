package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/redirector"
)

func newRedirectorCmd(g *globalFlags) *cobra.Command {
	cfg := redirector.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "redirector --redis URL --cgroup PATH [--target-cidrs CIDRS] [--pin-dir DIR]",
		Short: "Redirect connect() to agents, in the kernel, for every process in a cgroup",
		Long: `redirector loads tether's eBPF programs, attaches them to a cgroup v2 and keeps
their route map in sync with the registry. A process in that cgroup that
connects to an agent endpoint with a route (TCP, IPv4 or IPv4-mapped IPv6) is
sent to a live PS backend instead; getpeername() still shows the agent.

--cgroup is required. The root of the cgroup2 mount (every process of the
host) is allowed when named, with a warning. The redirector's own connections
(its Redis client) are never redirected, even inside that cgroup.

--target-cidrs limits the destinations that may be redirected. By default any
address may be, except loopback, link-local, unspecified, multicast and
broadcast ones: those only when --target-cidrs names a range inside them
(127.77.0.0/16 names 127.77.0.1; 0.0.0.0/0 names no loopback address). A route
whose target is not allowed is kept out of the kernel map, logged once and
counted in tether_redirector_routes_skipped_total.

Passive health: a redirected connect that is refused (RST to the SYN) or gets
no SYN-ACK within the first retransmit (about 1 s) marks its backend suspect
in the kernel; new connects avoid it for --suspect-hold while another backend
of the route is unmarked, then try it again. A connect is never refused
because of suspicion alone. --suspect-hold 0 turns it off.

Maps and links are pinned under --pin-dir: stopping or restarting the
redirector never stops redirection (a restart swaps the programs atomically on
the pinned links). "tether redirector uninstall" removes everything.`,
		Example: `  tether redirector --redis redis://10.0.0.5:6379/0 --cgroup /sys/fs/cgroup/unified/clients
  tether redirector --redis redis://127.0.0.1:6379/0 --cgroup /sys/fs/cgroup/unified --target-cidrs 10.0.0.0/8,127.77.0.0/16`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDaemon(cmd, g, &cfg, &cfg.Metrics, func(log *slog.Logger, reg *prometheus.Registry) (runner, error) {
				cfg.Logger = log
				cfg.Registerer = reg
				return redirector.New(cfg)
			})
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	cmd.AddCommand(newRedirectorStatusCmd(g), newRedirectorUninstallCmd(g), newRedirectorRoutesCmd(g))
	return cmd
}

type pinConfig struct {
	PinDir string `yaml:"pin-dir" flag:"pin-dir" usage:"bpffs directory of the pinned maps and links"`
	Cgroup string `yaml:"cgroup" flag:"cgroup" usage:"cgroup v2 directory the programs are attached to (optional: checked only)"`
	Output string `yaml:"-"`
}

func newRedirectorStatusCmd(g *globalFlags) *cobra.Command {
	cfg := pinConfig{PinDir: redirector.DefaultConfig().PinDir, Output: "table"}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Print the route map's size and the eBPF counters, read from the pins",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, &cfg); err != nil {
				return err
			}
			st, err := redirector.ReadStatus(cfg.PinDir)
			if err != nil {
				return err
			}
			switch cfg.Output {
			case "json":
				return writeJSON(cmd.OutOrStdout(), st)
			case "table":
				return writeStatus(cmd, st)
			default:
				return fmt.Errorf("output %q: want table or json", cfg.Output)
			}
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	cmd.Flags().StringVarP(&cfg.Output, "output", "o", cfg.Output, "output format: table or json")
	return cmd
}

func newRedirectorUninstallCmd(g *globalFlags) *cobra.Command {
	cfg := pinConfig{PinDir: redirector.DefaultConfig().PinDir}
	cmd := &cobra.Command{
		Use:   "uninstall [--pin-dir DIR] [--cgroup PATH]",
		Short: "Detach the programs and remove every pin the redirector made",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, &cfg); err != nil {
				return err
			}
			// The pinned links know their cgroup; --cgroup, when given,
			// is only checked, so that a typo is not silently accepted.
			if cfg.Cgroup != "" {
				if _, err := redirector.ResolveCgroup(cfg.Cgroup); err != nil {
					return err
				}
			}
			if err := checkPinDir(cfg.PinDir); err != nil {
				return err
			}
			if err := redirector.Uninstall(cfg.PinDir); err != nil {
				return err
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "uninstalled: %s removed, programs detached\n", cfg.PinDir)
			return err
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	return cmd
}

// checkPinDir makes sure dir is a redirector's pin directory before
// uninstall removes it. A directory that does not exist is an error, not
// a silent success: it is far more often a mistyped --pin-dir (leaving the
// real installation redirecting) than a second uninstall. And since
// uninstall removes the whole directory, one that holds anything but
// tether's pins (link_*, tether_*) is refused: --pin-dir /sys/fs/bpf or a
// home directory must never be emptied.
func checkPinDir(dir string) error {
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pin directory %s does not exist: nothing to uninstall there (the redirector pins under %s unless started with --pin-dir)", dir, redirector.DefaultConfig().PinDir)
	}
	if err != nil {
		return fmt.Errorf("pin directory: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("pin directory %s is not a directory", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("pin directory: %w", err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "tether_") && !strings.HasPrefix(e.Name(), "link_") {
			return fmt.Errorf("pin directory %s holds %q, which tether did not pin: refusing to remove the directory (is --pin-dir right?)", dir, e.Name())
		}
	}
	return nil
}

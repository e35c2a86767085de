package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/redirector"
	"github.com/tether-net/tether/registry"
)

// redirectorRoutesConfig is what `tether redirector routes` reads: the pin
// directory, and for --check the registry and the redirector's
// --target-cidrs (the same keys as the redirector's own config).
type redirectorRoutesConfig struct {
	PinDir      string   `yaml:"pin-dir" flag:"pin-dir" usage:"bpffs directory of the pinned maps and links"`
	Redis       string   `yaml:"redis" flag:"redis" usage:"Redis URL of the route registry (--check)"`
	RedisPrefix string   `yaml:"redis-prefix" flag:"redis-prefix" usage:"key prefix (hash tag) of the registry in Redis (--check)"`
	TargetCIDRs []string `yaml:"target-cidrs" flag:"target-cidrs" usage:"the redirector's --target-cidrs (--check): routes it keeps out of the map are not missing"`

	Check  bool          `yaml:"-"`
	Settle time.Duration `yaml:"-"`
	Output string        `yaml:"-"`
}

// errRoutesDiffer is the error (exit status 1) of a --check that found
// differences, after they are printed.
var errRoutesDiffer = errors.New("the kernel route map differs from the registry")

func newRedirectorRoutesCmd(g *globalFlags) *cobra.Command {
	def := redirector.DefaultConfig()
	cfg := redirectorRoutesConfig{PinDir: def.PinDir, Redis: def.Redis, RedisPrefix: def.RedisPrefix, Settle: time.Second, Output: "table"}
	cmd := &cobra.Command{
		Use:   "routes [TARGET] [--pin-dir DIR] [-o json] [--check --redis URL [--target-cidrs CIDRS]]",
		Short: "Print the kernel's route map decoded, or (--check) its difference from the registry",
		Long: `routes reads the pinned route map (tether_routes) and prints every route, or
only TARGET's (IP:PORT): each backend slot with its address, its state (live,
draining, dead), the time left before the deadline of its PS address
(tether_ps_deadline: past it the kernel stops picking the backend), and its
passive health mark (tether_suspect: how long ago a connect to it failed, and
whether connects avoid it now). USABLE says whether a connect may go there.

--check reads the registry and prints what differs: routes the map lacks
(missing), routes it holds that the registry has not (extra), and routes whose
backends differ in address or state. Give it the redirector's --redis,
--redis-prefix and --target-cidrs (or its --config file): routes the
redirector keeps out of the map are not missing. A difference is read twice,
--settle apart, so a change the redirector is applying is not reported. The
exit status is 1 when anything differs.`,
		Example: `  tether redirector routes
  tether redirector routes 198.18.1.11:9100 -o json
  tether redirector routes --check --redis redis://10.0.0.5:6379/0 --target-cidrs 198.18.0.0/15`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, &cfg); err != nil {
				return err
			}
			if cfg.Output != "table" && cfg.Output != "json" {
				return fmt.Errorf("output %q: want table or json", cfg.Output)
			}
			var target netip.AddrPort
			if len(args) == 1 {
				t, err := netip.ParseAddrPort(args[0])
				if err != nil {
					return fmt.Errorf("target %q: want IP:PORT, e.g. 198.18.1.11:9100", args[0])
				}
				target = netip.AddrPortFrom(t.Addr().Unmap(), t.Port())
			}
			if cfg.Check {
				return runRoutesCheck(cmd, g, cfg, target)
			}
			routes, err := redirector.ReadRoutes(cfg.PinDir, target)
			if err != nil {
				return err
			}
			if cfg.Output == "json" {
				if err := writeJSON(cmd.OutOrStdout(), routes); err != nil {
					return err
				}
			} else if err := writeKernelRoutes(cmd.OutOrStdout(), routes); err != nil {
				return err
			}
			if target.IsValid() && len(routes) == 0 {
				return fmt.Errorf("no route for %s in the kernel map %s", target, cfg.PinDir)
			}
			return nil
		},
	}
	cliconfig.Bind(cmd.Flags(), &cfg)
	cmd.Flags().BoolVar(&cfg.Check, "check", false, "compare the kernel map with the registry; exit status 1 when they differ")
	cmd.Flags().DurationVar(&cfg.Settle, "settle", cfg.Settle, "with --check: how long to wait before reading a difference again (0: report the first reading)")
	cmd.Flags().StringVarP(&cfg.Output, "output", "o", cfg.Output, "output format: table or json")
	return cmd
}

// runRoutesCheck prints the difference between the kernel map and the
// registry, and returns errRoutesDiffer when there is one.
func runRoutesCheck(cmd *cobra.Command, g *globalFlags, cfg redirectorRoutesConfig, target netip.AddrPort) error {
	targets, err := cidr.Parse(cfg.TargetCIDRs)
	if err != nil {
		return fmt.Errorf("--target-cidrs: %w", err)
	}
	log, err := g.logger(cmd)
	if err != nil {
		return err
	}
	reg, err := registry.New(registry.Config{URL: cfg.Redis, Prefix: cfg.RedisPrefix, Logger: log})
	if err != nil {
		return err
	}
	defer reg.Close()
	res, err := redirector.CheckRoutes(cmd.Context(), cfg.PinDir, reg, targets, target, cfg.Settle)
	if err != nil {
		return err
	}
	if res.Differences == nil {
		res.Differences = []redirector.RouteDiff{} // [] in JSON, not null
	}
	if cfg.Output == "json" {
		err = writeJSON(cmd.OutOrStdout(), res)
	} else {
		err = writeRouteCheck(cmd.OutOrStdout(), res)
	}
	if err != nil {
		return err
	}
	if n := len(res.Differences); n > 0 {
		return fmt.Errorf("%w: %d routes", errRoutesDiffer, n)
	}
	return nil
}

// writeKernelRoutes prints the decoded map, one line per backend slot.
func writeKernelRoutes(w io.Writer, routes []redirector.KernelRoute) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tSLOT\tBACKEND\tSTATE\tUSABLE\tPS DEADLINE\tSUSPECT")
	for _, r := range routes {
		if len(r.Backends) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t(no backend)\tno\t-\t-\n", r.Target)
		}
		for _, b := range r.Backends {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", r.Target, b.Slot, b.Address, b.State, yesNo(b.Usable), deadlineText(b.DeadlineLeftSeconds), suspectText(b.Suspect))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%d routes\n", len(routes))
	return err
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// deadlineText is the time left before a PS address's deadline.
func deadlineText(left *float64) string {
	switch {
	case left == nil:
		return "none (not checked)"
	case *left <= 0:
		return fmt.Sprintf("passed %s ago", seconds(-*left))
	default:
		return "in " + seconds(*left)
	}
}

func suspectText(m *redirector.SuspectMark) string {
	if m == nil {
		return "-"
	}
	state := "hold-down over"
	if m.WithinHoldDown {
		state = "avoided"
	}
	return fmt.Sprintf("marked %s ago, %s", seconds(m.MarkedSecondsAgo), state)
}

func seconds(s float64) string {
	return time.Duration(s * float64(time.Second)).Round(100 * time.Millisecond).String()
}

// writeRouteCheck prints a --check result: the counts, then one line per
// difference.
func writeRouteCheck(w io.Writer, res redirector.RouteCheck) error {
	fmt.Fprintf(w, "kernel map: %d routes; registry: %d routes the map should hold\n", res.KernelRoutes, res.RegistryRoutes)
	if len(res.Differences) == 0 {
		_, err := fmt.Fprintln(w, "no difference")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIFFERENCE\tTARGET\tDETAIL")
	for _, d := range res.Differences {
		var detail string
		switch d.Kind {
		case redirector.DiffMissing:
			detail = "registry has " + slotsText(d.Registry)
		case redirector.DiffExtra:
			detail = "kernel map has " + slotsText(d.Kernel)
		default:
			detail = strings.Join(d.Details, "; ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", d.Kind, d.Target, detail)
	}
	return tw.Flush()
}

func slotsText(slots []redirector.BackendSlot) string {
	parts := make([]string, len(slots))
	for i, s := range slots {
		parts[i] = fmt.Sprintf("%s (%s)", s.Address, s.State)
	}
	return strings.Join(parts, ", ")
}

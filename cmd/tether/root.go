package main

import (
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/buildinfo"
	"github.com/tether-net/tether/internal/daemon"
)

// globalFlags are the flags every subcommand shares.
type globalFlags struct {
	logLevel  string
	logFormat string
	config    string
}

func newRootCmd() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "tether",
		Short: "Reach agents in isolated networks by their own IP addresses",
		Long: `tether lets a central service reach agents inside isolated VPCs by the agents'
own IP addresses. Agents hold reverse tunnels to a pool of proxy servers (ps);
routes live in Redis; on client hosts an eBPF redirector rewrites connect()
to the right proxy server, so unmodified applications keep dialing agent-ip:port.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	pf.StringVar(&g.logFormat, "log-format", "text", "log format: text or json")
	pf.StringVarP(&g.config, "config", "c", "", "YAML configuration file; its keys mirror the flags (flags win)")

	root.AddCommand(
		newVersionCmd(),
		newRoutesCmd(g),
		newRedirectorCmd(g),
		newProxyCmd(g),
		newPSCmd(g),
		newAgentCmd(g),
		newCertsCmd(g),
	)
	return root
}

// logger builds the logger for a command from the global flags.
func (g *globalFlags) logger(cmd *cobra.Command) (*slog.Logger, error) {
	return daemon.NewLogger(cmd.ErrOrStderr(), g.logLevel, g.logFormat)
}

func newVersionCmd() *cobra.Command {
	output := "text"
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version, commit and Go version of this tether binary",
		Long: `version prints the build's identity: the version (set with -ldflags, else the
module version of "go install", else "dev"), the git commit ("-dirty" when the
work tree had changes; from the VCS data the go command embeds, or -ldflags)
and the Go toolchain. Every daemon exports the same as tether_build_info.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bi := buildinfo.Get()
			switch output {
			case "json":
				return writeJSON(cmd.OutOrStdout(), bi)
			case "text":
				_, err := fmt.Fprintln(cmd.OutOrStdout(), bi.String())
				return err
			default:
				return fmt.Errorf("--output %q: want text or json", output)
			}
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", output, "output format: text or json")
	return cmd
}

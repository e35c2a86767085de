package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/internal/pki"
)

const defaultPKIDir = "/etc/tether/pki"

// The configs of the certs subcommands. cliconfig binds flat structs only,
// hence one struct each rather than a shared embedded one.
type caCertConfig struct {
	Dir      string        `yaml:"dir" flag:"dir" usage:"directory of the CA files (ca.pem, ca-key.pem)"`
	Name     string        `yaml:"name" flag:"name" usage:"Subject CN of the CA"`
	ValidFor time.Duration `yaml:"valid-for" flag:"valid-for" usage:"validity of the CA"`
	Force    bool          `yaml:"force" flag:"force" usage:"replace existing files (a new CA orphans every certificate the old one signed)"`
}

type psCertConfig struct {
	Dir      string        `yaml:"dir" flag:"dir" usage:"directory holding the CA; the certificate is written there too"`
	Name     string        `yaml:"name" flag:"name" usage:"PS name: Subject CN and file names NAME.pem, NAME-key.pem"`
	IPs      []string      `yaml:"ip" flag:"ip" usage:"IP address agents dial this PS by (repeat; include the VIP)"`
	DNS      []string      `yaml:"dns" flag:"dns" usage:"DNS name agents dial this PS by (repeat; include the VIP's name)"`
	ValidFor time.Duration `yaml:"valid-for" flag:"valid-for" usage:"validity of the certificate"`
	Force    bool          `yaml:"force" flag:"force" usage:"replace existing files"`
}

type agentCertConfig struct {
	Dir      string        `yaml:"dir" flag:"dir" usage:"directory holding the CA; the certificate is written there too"`
	ID       string        `yaml:"id" flag:"id" usage:"agent id the certificate speaks for (Subject CN and URI SAN spiffe://tether/agent/ID)"`
	IPs      []string      `yaml:"ip" flag:"ip" usage:"address the agent may expose (repeat); none: only its tunnel's source address"`
	Name     string        `yaml:"name" flag:"name" usage:"file names NAME.pem, NAME-key.pem (default agent-ID)"`
	ValidFor time.Duration `yaml:"valid-for" flag:"valid-for" usage:"validity of the certificate"`
	Force    bool          `yaml:"force" flag:"force" usage:"replace existing files"`
}

type initCertConfig struct {
	Dir        string        `yaml:"dir" flag:"dir" usage:"directory to write the CA and certificates to (an existing CA there is reused)"`
	PSName     string        `yaml:"ps-name" flag:"ps-name" usage:"PS certificate name: Subject CN and file names"`
	PSIPs      []string      `yaml:"ps-ip" flag:"ps-ip" usage:"IP address agents dial the PS nodes by (repeat; include the VIP)"`
	PSDNS      []string      `yaml:"ps-dns" flag:"ps-dns" usage:"DNS name agents dial the PS nodes by (repeat)"`
	Agents     []string      `yaml:"agent" flag:"agent" usage:"agent id to issue a client certificate for (repeat)"`
	ValidFor   time.Duration `yaml:"valid-for" flag:"valid-for" usage:"validity of the PS and agent certificates"`
	CAValidFor time.Duration `yaml:"ca-valid-for" flag:"ca-valid-for" usage:"validity of the CA, when one is made"`
	Force      bool          `yaml:"force" flag:"force" usage:"replace existing PS and agent files (never the CA)"`
}

func newCertsCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Make a CA and the PS and agent certificates for TLS and mTLS tunnels",
		Long: `certs makes a private CA (ECDSA P-256) and issues PS server certificates and
agent client certificates from it, as PEM files: keys 0600, certificates 0644.
An existing file is never replaced without --force.

An agent certificate speaks for one agent id (Subject CN and URI SAN
spiffe://tether/agent/ID): a PS started with --tls-ca accepts that agent id
only from it. Its IP SANs (--ip) are the addresses the agent may expose;
without any, only its tunnel's source address.`,
		Example: `  tether certs init --dir /etc/tether/pki --ps-dns ps.example.internal --ps-ip 10.0.0.10 --agent host-11
  tether certs agent --dir /etc/tether/pki --id host-12 --ip 10.1.2.3`,
	}
	cmd.AddCommand(newCertsCACmd(g), newCertsPSCmd(g), newCertsAgentCmd(g), newCertsInitCmd(g), newCertsShowCmd())
	return cmd
}

func newCertsCACmd(g *globalFlags) *cobra.Command {
	cfg := &caCertConfig{Dir: defaultPKIDir, Name: "tether CA", ValidFor: pki.DefaultCAValidity}
	cmd := &cobra.Command{
		Use:   "ca --dir DIR",
		Short: "Make a new CA: DIR/ca.pem and DIR/ca-key.pem",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, cfg); err != nil {
				return err
			}
			if err := positive("--valid-for", cfg.ValidFor); err != nil {
				return err
			}
			if cfg.Name == "" {
				return errors.New("--name: the CA needs a name")
			}
			_, err := makeCA(cmd.OutOrStdout(), cfg.Dir, cfg.Name, cfg.ValidFor, cfg.Force)
			return err
		},
	}
	cliconfig.Bind(cmd.Flags(), cfg)
	return cmd
}

func newCertsPSCmd(g *globalFlags) *cobra.Command {
	cfg := &psCertConfig{Dir: defaultPKIDir, ValidFor: pki.DefaultLeafValidity}
	cmd := &cobra.Command{
		Use:   "ps --dir DIR --name NAME (--ip IP | --dns NAME)...",
		Short: "Issue a PS server certificate from the CA in DIR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, cfg); err != nil {
				return err
			}
			if err := positive("--valid-for", cfg.ValidFor); err != nil {
				return err
			}
			ca, err := loadCA(cfg.Dir)
			if err != nil {
				return err
			}
			return issuePS(cmd.OutOrStdout(), ca, cfg.Dir, cfg.Name, "--ip", cfg.IPs, cfg.DNS, cfg.ValidFor, cfg.Force)
		},
	}
	cliconfig.Bind(cmd.Flags(), cfg)
	return cmd
}

func newCertsAgentCmd(g *globalFlags) *cobra.Command {
	cfg := &agentCertConfig{Dir: defaultPKIDir, ValidFor: pki.DefaultLeafValidity}
	cmd := &cobra.Command{
		Use:   "agent --dir DIR --id ID [--ip IP]...",
		Short: "Issue an agent client certificate from the CA in DIR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, cfg); err != nil {
				return err
			}
			if err := positive("--valid-for", cfg.ValidFor); err != nil {
				return err
			}
			ca, err := loadCA(cfg.Dir)
			if err != nil {
				return err
			}
			return issueAgent(cmd.OutOrStdout(), ca, cfg.Dir, cfg.ID, cfg.Name, cfg.IPs, cfg.ValidFor, cfg.Force)
		},
	}
	cliconfig.Bind(cmd.Flags(), cfg)
	return cmd
}

func newCertsInitCmd(g *globalFlags) *cobra.Command {
	cfg := &initCertConfig{Dir: defaultPKIDir, PSName: "ps", ValidFor: pki.DefaultLeafValidity, CAValidFor: pki.DefaultCAValidity}
	cmd := &cobra.Command{
		Use:   "init --dir DIR (--ps-ip IP | --ps-dns NAME)... [--agent ID]...",
		Short: "Make (or reuse) the CA in DIR, a PS certificate shared by the PS nodes, and agent certificates",
		Long: `init does ca (unless DIR already holds one, which is then reused), ps and
agent in one go. The PS certificate names every address and name agents dial
(the VIP, and each node's own address if agents may dial it), so all PS nodes
can share it. Agent certificates made here carry no IP SANs; issue one with
'tether certs agent --ip' for an agent that exposes addresses other than its
tunnel's source.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cliconfig.Resolve(cmd.Flags(), g.config, cfg); err != nil {
				return err
			}
			return runCertsInit(cmd.OutOrStdout(), cfg)
		},
	}
	cliconfig.Bind(cmd.Flags(), cfg)
	return cmd
}

func runCertsInit(w io.Writer, cfg *initCertConfig) error {
	// Check every argument before writing anything, so a typo in the last
	// --agent does not leave a half-made directory.
	if err := errors.Join(positive("--valid-for", cfg.ValidFor), positive("--ca-valid-for", cfg.CAValidFor)); err != nil {
		return err
	}
	if _, err := parseIPs("--ps-ip", cfg.PSIPs); err != nil {
		return err
	}
	if len(cfg.PSIPs) == 0 && len(cfg.PSDNS) == 0 {
		return errors.New("--ps-ip or --ps-dns: give at least one address or name agents dial the PS by")
	}
	if err := pki.ValidFileBase(cfg.PSName); err != nil {
		return fmt.Errorf("--ps-name: %w", err)
	}
	for _, id := range cfg.Agents {
		if _, err := agentFileBase(id, ""); err != nil {
			return err
		}
	}
	ca, err := pki.LoadCA(cfg.Dir)
	switch {
	case err == nil:
		fmt.Fprintf(w, "using the existing CA %s\n", absPath(filepath.Join(cfg.Dir, pki.CACertFile)))
	case errors.Is(err, fs.ErrNotExist):
		if ca, err = makeCA(w, cfg.Dir, "tether CA", cfg.CAValidFor, false); err != nil {
			return err
		}
	default:
		return err
	}
	if err := issuePS(w, ca, cfg.Dir, cfg.PSName, "--ps-ip", cfg.PSIPs, cfg.PSDNS, cfg.ValidFor, cfg.Force); err != nil {
		return err
	}
	for _, id := range cfg.Agents {
		if err := issueAgent(w, ca, cfg.Dir, id, "", nil, cfg.ValidFor, cfg.Force); err != nil {
			return err
		}
	}
	return nil
}

func makeCA(w io.Writer, dir, name string, validFor time.Duration, force bool) (*pki.CA, error) {
	ca, err := pki.NewCA(name, validFor)
	if err != nil {
		return nil, err
	}
	certPath, keyPath, err := ca.WriteFiles(dir, force)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(w, "wrote %s  CA certificate, valid until %s: copy it to every PS and agent\n", absPath(certPath), day(ca.Cert))
	fmt.Fprintf(w, "wrote %s  CA key: keep it secret (offline when you can); it issues PS and agent certificates\n", absPath(keyPath))
	return ca, nil
}

func issuePS(w io.Writer, ca *pki.CA, dir, name, ipFlag string, ips, dns []string, validFor time.Duration, force bool) error {
	if len(ips) == 0 && len(dns) == 0 {
		return fmt.Errorf("%s or %s: give at least one address or name agents dial the PS by", ipFlag, strings.Replace(ipFlag, "ip", "dns", 1))
	}
	if err := pki.ValidFileBase(name); err != nil {
		return fmt.Errorf("PS name (--name): %w", err)
	}
	addrs, err := parseIPs(ipFlag, ips)
	if err != nil {
		return err
	}
	leaf, err := ca.IssueServer(name, dns, addrs, validFor)
	if err != nil {
		return err
	}
	certPath, keyPath, err := leaf.WriteFiles(dir, name, force)
	if err != nil {
		return err
	}
	names := strings.Join(slices.Concat(dns, ips), ", ")
	fmt.Fprintf(w, "wrote %s  PS certificate for %s, valid until %s\n", absPath(certPath), names, day(leaf.Cert))
	fmt.Fprintf(w, "wrote %s  its key\n", absPath(keyPath))
	fmt.Fprintf(w, "  run: tether ps --tls-cert %s --tls-key %s --tls-ca %s ...\n",
		absPath(certPath), absPath(keyPath), absPath(filepath.Join(dir, pki.CACertFile)))
	fmt.Fprintf(w, "  agents must dial the PS by one of %s (or set --tls-server-name to one)\n", names)
	return nil
}

func issueAgent(w io.Writer, ca *pki.CA, dir, id, base string, ips []string, validFor time.Duration, force bool) error {
	base, err := agentFileBase(id, base)
	if err != nil {
		return err
	}
	addrs, err := parseIPs("--ip", ips)
	if err != nil {
		return err
	}
	leaf, err := ca.IssueAgent(id, addrs, validFor)
	if err != nil {
		return err
	}
	certPath, keyPath, err := leaf.WriteFiles(dir, base, force)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %s  agent certificate for id %s (may expose %s), valid until %s\n",
		absPath(certPath), id, exposes(pki.AgentAddrs(leaf.Cert)), day(leaf.Cert))
	fmt.Fprintf(w, "wrote %s  its key\n", absPath(keyPath))
	fmt.Fprintf(w, "  run: tether agent --id %s --tls-cert %s --tls-key %s --tls-ca %s ...\n",
		id, absPath(certPath), absPath(keyPath), absPath(filepath.Join(dir, pki.CACertFile)))
	return nil
}

// agentFileBase checks the agent id and picks the file base name: base when
// given, else agent-ID, which must then be a safe file name.
func agentFileBase(id, base string) (string, error) {
	if err := ident.Valid(id); err != nil {
		return "", fmt.Errorf("--id / --agent: %w", err)
	}
	if base != "" {
		return base, pki.ValidFileBase(base)
	}
	base = "agent-" + id
	if err := pki.ValidFileBase(base); err != nil {
		return "", fmt.Errorf("agent id %q cannot name a file (%w); give the file name with 'tether certs agent --name'", id, err)
	}
	return base, nil
}

// loadCA loads the CA of dir, and says how to make one when there is none.
func loadCA(dir string) (*pki.CA, error) {
	ca, err := pki.LoadCA(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w (make a CA first: tether certs ca --dir %s)", err, dir)
	}
	return ca, err
}

func positive(flag string, d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("%s %s: must be positive", flag, d)
	}
	return nil
}

func parseIPs(flag string, raw []string) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(raw))
	for _, s := range raw {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("%s %q: not an IP address", flag, s)
		}
		out = append(out, a)
	}
	return out, nil
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

func day(c *x509.Certificate) string { return c.NotAfter.UTC().Format(time.DateOnly) }

func newCertsShowCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show FILE...",
		Short: "Show what certificates say: subject, validity, names, agent identity",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, p := range args {
				c, err := pki.ReadCert(p)
				if err != nil {
					return err
				}
				showCert(cmd.OutOrStdout(), p, c)
			}
			return nil
		},
	}
}

func showCert(w io.Writer, path string, c *x509.Certificate) {
	fmt.Fprintf(w, "%s\n  subject:  %s\n  issuer:   %s\n  valid:    %s to %s\n", path, c.Subject, c.Issuer,
		c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339))
	switch {
	case c.IsCA:
		fmt.Fprintln(w, "  kind:     CA")
	case slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth):
		id, err := pki.AgentIdentity(c)
		if err != nil {
			fmt.Fprintf(w, "  kind:     client certificate with no usable agent identity: %v\n", err)
		} else {
			fmt.Fprintf(w, "  kind:     agent certificate for id %s\n", id)
		}
		fmt.Fprintf(w, "  exposes:  %s\n", exposes(pki.AgentAddrs(c)))
	case slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageServerAuth):
		fmt.Fprintf(w, "  kind:     PS certificate for %s\n", strings.Join(slices.Concat(c.DNSNames, ipStrings(c)), ", "))
	}
}

func exposes(addrs []netip.Addr) string {
	if len(addrs) == 0 {
		return "only its tunnel's source address"
	}
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}

func ipStrings(c *x509.Certificate) []string {
	s := make([]string, len(c.IPAddresses))
	for i, ip := range c.IPAddresses {
		s[i] = ip.String()
	}
	return s
}

package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/registry"
)

// Config configures the proxy.
type Config struct {
	Redis        string   `yaml:"redis" flag:"redis" usage:"the route registry: host:port, redis://, rediss:// or unix:// URL"`
	RedisPrefix  string   `yaml:"redis-prefix" flag:"redis-prefix" usage:"key prefix (hash tag) of the registry in Redis"`
	Socks        string   `yaml:"socks" flag:"socks" usage:"address of the SOCKS5 listener (empty = off)"`
	HTTP         string   `yaml:"http" flag:"http" usage:"address of the HTTP proxy listener (empty = off)"`
	AllowClients []string `yaml:"allow-clients" flag:"allow-clients" usage:"CIDRs allowed to use the proxy (empty = any); a listener off loopback needs this or --auth-file"`
	Passthrough  bool     `yaml:"passthrough" flag:"passthrough" usage:"dial targets without a route directly instead of refusing them (never the proxy host's own addresses, nor loopback, link-local and other special addresses unless --passthrough-cidrs names them)"`
	// PassthroughCIDRs follows the PS's --agent-cidrs rule: a special
	// range is reached only when named by a CIDR that lies inside it, so
	// 0.0.0.0/0 does not open loopback but 127.77.0.0/16 opens that range.
	PassthroughCIDRs []string      `yaml:"passthrough-cidrs" flag:"passthrough-cidrs" usage:"CIDRs --passthrough may reach (empty = any address outside the special ranges); loopback, link-local, unspecified, multicast and broadcast addresses only when a CIDR here lies inside their range"`
	AuthFile         string        `yaml:"auth-file" flag:"auth-file" usage:"file of user:password lines; when set, SOCKS5 requires username/password and HTTP requires Proxy-Authorization"`
	DialTimeout      time.Duration `yaml:"dial-timeout" flag:"dial-timeout" usage:"timeout dialing a backend"`
	Resync           time.Duration `yaml:"resync" flag:"resync" usage:"anti-entropy period: a full reload of the registry"`
	Metrics          string        `yaml:"metrics" flag:"metrics" usage:"address to serve /metrics and /healthz on (empty = off)"`

	Logger     *slog.Logger          `yaml:"-"`
	Registerer prometheus.Registerer `yaml:"-"`
}

// DefaultConfig returns the proxy's defaults.
func DefaultConfig() Config {
	return Config{
		Redis:       "redis://127.0.0.1:6379/0",
		RedisPrefix: "tether",
		DialTimeout: 5 * time.Second,
		Resync:      30 * time.Second,
	}
}

// Validate checks the config and names what is wrong.
func (c *Config) Validate() error {
	var errs []error
	if c.Redis == "" {
		errs = append(errs, errors.New("--redis is required"))
	} else if _, err := registry.ParseRedisAddress(c.Redis); err != nil {
		// Before anything starts: the redirector would attach first.
		errs = append(errs, fmt.Errorf("--redis: %w", err))
	}
	if c.Socks == "" && c.HTTP == "" {
		errs = append(errs, errors.New("set --socks, --http or both"))
	}
	allow, err := cidr.Parse(c.AllowClients)
	if err != nil {
		errs = append(errs, fmt.Errorf("--allow-clients: %w", err))
	}
	if _, err := cidr.Parse(c.PassthroughCIDRs); err != nil {
		errs = append(errs, fmt.Errorf("--passthrough-cidrs: %w", err))
	}
	if len(c.PassthroughCIDRs) > 0 && !c.Passthrough {
		errs = append(errs, errors.New("--passthrough-cidrs needs --passthrough"))
	}
	for _, l := range []struct{ flag, addr string }{{"--socks", c.Socks}, {"--http", c.HTTP}} {
		if l.addr == "" {
			continue
		}
		if err := c.checkExposure(l.flag, l.addr, len(allow) > 0); err != nil {
			errs = append(errs, err)
		}
	}
	if c.DialTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--dial-timeout %v must be positive", c.DialTimeout))
	}
	if c.Resync < time.Second {
		errs = append(errs, fmt.Errorf("--resync %v is too short (at least 1s)", c.Resync))
	}
	return errors.Join(errs...)
}

// checkExposure refuses a listener beyond loopback unless clients must
// authenticate (--auth-file) or come from --allow-clients: an open proxy
// on a reachable address lends the host's network, and every agent's, to
// anyone who finds it. Run checks the bound address again, for a name
// that resolved to something other than loopback.
func (c *Config) checkExposure(flag, addr string, allowList bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s %q: want host:port: %w", flag, addr, err)
	}
	if c.AuthFile != "" || allowList || isLoopbackHost(host) {
		return nil
	}
	return fmt.Errorf("%s %s listens beyond loopback without --auth-file or --allow-clients: set one of them, or listen on 127.0.0.1", flag, addr)
}

// isLoopbackHost says whether a listener on host is reachable from this
// host only: a loopback IP literal or "localhost". An empty host, 0.0.0.0
// and :: listen on every address; any other name counts as reachable.
func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

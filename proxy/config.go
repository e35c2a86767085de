package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/cidr"
)

// Config configures the proxy.
type Config struct {
	Redis        string        `yaml:"redis" flag:"redis" usage:"Redis URL of the route registry"`
	RedisPrefix  string        `yaml:"redis-prefix" flag:"redis-prefix" usage:"key prefix (hash tag) of the registry in Redis"`
	Socks        string        `yaml:"socks" flag:"socks" usage:"address of the SOCKS5 listener (empty = off)"`
	HTTP         string        `yaml:"http" flag:"http" usage:"address of the HTTP proxy listener (empty = off)"`
	AllowClients []string      `yaml:"allow-clients" flag:"allow-clients" usage:"CIDRs allowed to use the proxy (empty = any)"`
	Passthrough  bool          `yaml:"passthrough" flag:"passthrough" usage:"dial targets without a route directly instead of refusing them"`
	AuthFile     string        `yaml:"auth-file" flag:"auth-file" usage:"file of user:password lines; when set, SOCKS5 requires username/password and HTTP requires Proxy-Authorization"`
	DialTimeout  time.Duration `yaml:"dial-timeout" flag:"dial-timeout" usage:"timeout dialing a backend"`
	Resync       time.Duration `yaml:"resync" flag:"resync" usage:"anti-entropy period: a full reload of the registry"`
	Metrics      string        `yaml:"metrics" flag:"metrics" usage:"address to serve /metrics and /healthz on (empty = off)"`

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
	}
	if c.Socks == "" && c.HTTP == "" {
		errs = append(errs, errors.New("set --socks, --http or both"))
	}
	if _, err := cidr.Parse(c.AllowClients); err != nil {
		errs = append(errs, fmt.Errorf("--allow-clients: %w", err))
	}
	if c.DialTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--dial-timeout %v must be positive", c.DialTimeout))
	}
	if c.Resync < time.Second {
		errs = append(errs, fmt.Errorf("--resync %v is too short (at least 1s)", c.Resync))
	}
	return errors.Join(errs...)
}

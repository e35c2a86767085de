package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/tunnel"
)

// Config configures an agent.
type Config struct {
	Servers   []string `yaml:"server" flag:"server" usage:"PS tunnel address HOST:PORT (repeat, or comma-separate; a name with several addresses counts as several servers)"`
	ID        string   `yaml:"id" flag:"id" usage:"this agent's id, unique among agents"`
	IP        string   `yaml:"ip" flag:"ip" usage:"the agent's IP, the address its routes use (default: source address towards the first server)"`
	Expose    []string `yaml:"expose" flag:"expose" usage:"endpoint to expose: PORT (route and dial IP:PORT) or PORT=HOST:PORT (route IP:PORT, dial HOST:PORT); repeat"`
	Tunnels   int      `yaml:"tunnels" flag:"tunnels" usage:"tunnels to hold, each on a distinct PS"`
	TokenFile string   `yaml:"token-file" flag:"token-file" usage:"file holding the token (else env TETHER_TOKEN)"`
	Metrics   string   `yaml:"metrics" flag:"metrics" usage:"address to serve /metrics and /healthz on (empty = off)"`

	TLSCert       string `yaml:"tls-cert" flag:"tls-cert" usage:"PEM client certificate, for a PS that requires one"`
	TLSKey        string `yaml:"tls-key" flag:"tls-key" usage:"PEM private key of --tls-cert"`
	TLSCA         string `yaml:"tls-ca" flag:"tls-ca" usage:"PEM CA bundle the PS certificate must chain to (enables TLS; without it TLS verifies against system roots)"`
	TLSServerName string `yaml:"tls-server-name" flag:"tls-server-name" usage:"name to verify the PS certificate against (default: the host of --server)"`

	DialTimeout     time.Duration `yaml:"dial-timeout" flag:"dial-timeout" usage:"timeout dialing a local target"`
	ConnectTimeout  time.Duration `yaml:"connect-timeout" flag:"connect-timeout" usage:"timeout of a tunnel's dial and handshake"`
	BackoffMin      time.Duration `yaml:"backoff-min" flag:"backoff-min" usage:"first reconnect backoff ceiling"`
	BackoffMax      time.Duration `yaml:"backoff-max" flag:"backoff-max" usage:"largest reconnect backoff"`
	StableAfter     time.Duration `yaml:"stable-after" flag:"stable-after" usage:"a tunnel up this long resets the backoff"`
	StreamWindow    int           `yaml:"stream-window" flag:"stream-window" usage:"yamux receive window per stream, bytes"`
	RetryRefused    time.Duration `yaml:"retry-refused" flag:"retry-refused" usage:"how long after a PS refused endpoints (conflict, no free port) the agent asks again"`
	DrainTimeout    time.Duration `yaml:"drain-timeout" flag:"drain-timeout" usage:"on SIGTERM, how long streams in flight may take to finish after the routes were withdrawn (a second signal stops at once)"`
	TunnelDeadAfter time.Duration `yaml:"tunnel-dead-after" flag:"tunnel-dead-after" usage:"close a tunnel whose PS sent nothing (not even a ping answer) for this long, and reconnect"`
	PoolSize        int           `yaml:"pool-size" flag:"pool-size" usage:"idle data connections to keep per tunnel for the pooled data path (at most what the PS grants); 0 = never join a pool, use the tunnel's streams only"`

	// Set by code, not by flags.
	Logger     *slog.Logger          `yaml:"-"`
	Registerer prometheus.Registerer `yaml:"-"`
	// DisableControl makes the tunnels refuse the PS's control channel as
	// an agent that predates it does: no lost-tunnel reports, no withdraw
	// on drain (tests of that compatibility).
	DisableControl bool `yaml:"-"`
	// Token, when set, is used instead of TokenFile / TETHER_TOKEN.
	Token string `yaml:"-"`
	// LookupNetIP resolves server names; default net.DefaultResolver.
	LookupNetIP func(ctx context.Context, host string) ([]netip.Addr, error) `yaml:"-"`
}

// MaxPoolSize bounds --pool-size: each idle data connection is a socket
// on both ends, per tunnel, and a pool only needs to cover the burst of
// new connections that arrive within one refill (a dial round trip).
const MaxPoolSize = 1024

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Tunnels:         2,
		DialTimeout:     5 * time.Second,
		ConnectTimeout:  10 * time.Second,
		BackoffMin:      500 * time.Millisecond,
		BackoffMax:      30 * time.Second,
		StableAfter:     30 * time.Second,
		StreamWindow:    tunnel.DefaultStreamWindow,
		RetryRefused:    time.Minute,
		TunnelDeadAfter: tunnel.DefaultDeadAfter,
		DrainTimeout:    30 * time.Second,
		PoolSize:        8,
	}
}

// Exposure is one endpoint the agent exposes: its route target and the
// local address streams for it are dialed at.
type Exposure struct {
	Port uint16 // the route is AgentIP:Port
	Dial string // HOST:PORT to dial; empty = AgentIP:Port
}

// ParseExpose parses an --expose SPEC: PORT or PORT=HOST:PORT.
func ParseExpose(spec string) (Exposure, error) {
	portStr, dial, hasDial := strings.Cut(strings.TrimSpace(spec), "=")
	p, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || p == 0 {
		return Exposure{}, fmt.Errorf("--expose %q: want PORT or PORT=HOST:PORT with PORT 1-65535", spec)
	}
	e := Exposure{Port: uint16(p)}
	if hasDial {
		host, port, err := net.SplitHostPort(dial)
		if err != nil || host == "" {
			return Exposure{}, fmt.Errorf("--expose %q: dial target %q is not HOST:PORT", spec, dial)
		}
		if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
			return Exposure{}, fmt.Errorf("--expose %q: dial port %q is not 1-65535", spec, port)
		}
		e.Dial = dial
	}
	return e, nil
}

// Validate checks the configuration and names what is wrong.
func (c *Config) Validate() error {
	var errs []error
	if len(c.Servers) == 0 {
		errs = append(errs, errors.New("--server is required"))
	}
	for _, s := range c.Servers {
		if host, port, err := net.SplitHostPort(s); err != nil || host == "" || port == "" {
			errs = append(errs, fmt.Errorf("--server %q: want HOST:PORT", s))
		}
	}
	if err := ident.Valid(c.ID); err != nil {
		errs = append(errs, fmt.Errorf("--id: %w", err))
	}
	if c.IP != "" {
		if a, err := netip.ParseAddr(c.IP); err != nil || a.IsUnspecified() || a.Zone() != "" {
			errs = append(errs, fmt.Errorf("--ip %q: want a unicast IP address", c.IP))
		}
	}
	if len(c.Expose) == 0 {
		errs = append(errs, errors.New("--expose: at least one endpoint is required"))
	}
	seen := map[uint16]bool{}
	for _, s := range c.Expose {
		e, err := ParseExpose(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if seen[e.Port] {
			errs = append(errs, fmt.Errorf("--expose: port %d given twice", e.Port))
		}
		seen[e.Port] = true
	}
	if c.Tunnels < 1 || c.Tunnels > tunnel.MaxHeldPS {
		errs = append(errs, fmt.Errorf("--tunnels %d: want 1-%d", c.Tunnels, tunnel.MaxHeldPS))
	}
	if c.DialTimeout <= 0 || c.ConnectTimeout <= 0 || c.BackoffMin <= 0 || c.BackoffMax < c.BackoffMin || c.StableAfter <= 0 || c.RetryRefused <= 0 {
		errs = append(errs, errors.New("timeouts and backoffs must be positive, and --backoff-max >= --backoff-min"))
	}
	if c.DrainTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--drain-timeout %v: want a positive duration", c.DrainTimeout))
	}
	if c.TunnelDeadAfter < tunnel.MinDeadAfter {
		errs = append(errs, fmt.Errorf("--tunnel-dead-after %v: want at least %v", c.TunnelDeadAfter, tunnel.MinDeadAfter))
	}
	if c.StreamWindow < 256<<10 || c.StreamWindow > 1<<30 {
		errs = append(errs, fmt.Errorf("--stream-window %d: want 256 KiB to 1 GiB", c.StreamWindow))
	}
	if c.PoolSize < 0 || c.PoolSize > MaxPoolSize {
		errs = append(errs, fmt.Errorf("--pool-size %d: want 0-%d", c.PoolSize, MaxPoolSize))
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, errors.New("--tls-cert and --tls-key go together"))
	}
	return errors.Join(errs...)
}

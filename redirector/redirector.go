package redirector

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/registry"
)

// Config configures the redirector daemon.
type Config struct {
	Redis       string        `yaml:"redis" flag:"redis" usage:"the route registry: host:port, redis://, rediss:// or unix:// URL"`
	RedisPrefix string        `yaml:"redis-prefix" flag:"redis-prefix" usage:"key prefix (hash tag) of the registry in Redis"`
	Cgroup      string        `yaml:"cgroup" flag:"cgroup" usage:"cgroup v2 directory whose processes are redirected (required; the root of the cgroup2 mount, i.e. every process of the host, only when named)"`
	TargetCIDRs []string      `yaml:"target-cidrs" flag:"target-cidrs" usage:"destinations that may be redirected (default: any but loopback, link-local, unspecified, multicast; those only when a range inside them is named, e.g. 127.77.0.0/16)"`
	PinDir      string        `yaml:"pin-dir" flag:"pin-dir" usage:"bpffs directory for the pinned maps and links"`
	Resync      time.Duration `yaml:"resync" flag:"resync" usage:"anti-entropy period: a full reload of the registry"`
	MapSize     int           `yaml:"map-size" flag:"map-size" usage:"capacity of the route map (routes)"`
	Metrics     string        `yaml:"metrics" flag:"metrics" usage:"address to serve /metrics and /healthz on (empty = off)"`
	KernelGrace time.Duration `yaml:"kernel-grace" flag:"kernel-grace" usage:"how long past a PS's lease the kernel keeps redirecting to it when no redirector refreshes the map (a redirector restart must take less)"`
	SuspectHold time.Duration `yaml:"suspect-hold" flag:"suspect-hold" usage:"passive health: how long connects avoid a backend after a connect to it was refused or got no SYN-ACK, while another backend is unmarked (0 = off)"`

	Logger     *slog.Logger          `yaml:"-"`
	Registerer prometheus.Registerer `yaml:"-"`

	// forceNetlinkDestroy tests the fallback for kernels < 6.5.
	forceNetlinkDestroy bool
}

// DefaultConfig returns the defaults of the redirector.
func DefaultConfig() Config {
	return Config{
		Redis:       "redis://127.0.0.1:6379/0",
		RedisPrefix: "tether",
		PinDir:      "/sys/fs/bpf/tether",
		Resync:      30 * time.Second,
		MapSize:     1000000,
		KernelGrace: 2 * time.Minute,
		SuspectHold: 5 * time.Second,
	}
}

// errNoCgroup is the one-line answer to a missing --cgroup. There is no
// default: the root of the cgroup2 mount would redirect every process of
// the host, which must be asked for by name.
var errNoCgroup = errors.New("--cgroup is required: the cgroup v2 directory whose processes are redirected, e.g. --cgroup /sys/fs/cgroup/unified/clients")

// Validate checks the config and names what is wrong.
func (c *Config) Validate() error {
	var errs []error
	if c.Redis == "" {
		errs = append(errs, errors.New("--redis is required"))
	} else if _, err := registry.ParseRedisAddress(c.Redis); err != nil {
		// Before anything starts: the redirector would attach first.
		errs = append(errs, fmt.Errorf("--redis: %w", err))
	}
	if c.Cgroup == "" {
		errs = append(errs, errNoCgroup)
	}
	if _, err := c.targets(); err != nil {
		errs = append(errs, err)
	}
	if !filepath.IsAbs(c.PinDir) {
		errs = append(errs, fmt.Errorf("--pin-dir %q must be an absolute path on bpffs", c.PinDir))
	}
	if c.Resync < time.Second {
		errs = append(errs, fmt.Errorf("--resync %v is too short (at least 1s)", c.Resync))
	}
	if c.MapSize < 1 || c.MapSize > 1<<26 {
		errs = append(errs, fmt.Errorf("--map-size %d is out of range 1-%d", c.MapSize, 1<<26))
	}
	if c.KernelGrace < time.Second || c.KernelGrace > 24*time.Hour {
		errs = append(errs, fmt.Errorf("--kernel-grace %v is out of range 1s-24h", c.KernelGrace))
	}
	if c.SuspectHold < 0 || c.SuspectHold > time.Hour {
		errs = append(errs, fmt.Errorf("--suspect-hold %v is out of range 0-1h (0 turns passive health off)", c.SuspectHold))
	}
	return errors.Join(errs...)
}

// targets parses TargetCIDRs.
func (c *Config) targets() (cidr.List, error) {
	l, err := cidr.Parse(c.TargetCIDRs)
	if err != nil {
		return nil, fmt.Errorf("--target-cidrs: %w", err)
	}
	return l, nil
}

// Status is what `tether redirector status` prints, read from the pins.
type Status struct {
	PinDir   string            `json:"pin_dir"`
	Routes   int               `json:"routes"`
	Capacity uint32            `json:"capacity"`
	Counters map[string]uint64 `json:"counters"`
	Links    []string          `json:"links"`
	// Writes is what the running (or last) redirector reported about its
	// route map writes; nil when none has (an older version).
	Writes *WriteStatus `json:"writes,omitempty"`
	// Deadlines is the PS deadlines in the kernel map.
	Deadlines DeadlineStatus `json:"ps_deadlines"`
	// Health is passive health (health_linux.go); nil on an installation
	// of a version without it.
	Health *HealthStatus `json:"passive_health,omitempty"`
	// Daemon says whether a redirector is running (state_linux.go).
	Daemon DaemonStatus `json:"daemon"`
	// Cgroup is the cgroup the pinned links are attached to ("" when it
	// cannot be found under the cgroup2 mount); Programs the pinned links.
	Cgroup   string          `json:"cgroup"`
	Programs []ProgramStatus `json:"programs"`
}

// DaemonStatus is whether a redirector is running, judged by the
// heartbeat it writes into the pinned state map every second.
type DaemonStatus struct {
	Running bool   `json:"running"`
	Verdict string `json:"verdict"`
	// PID is the last writer's PID in its own PID namespace (0: unknown);
	// PIDExistsHere whether a process with that PID exists in the status
	// command's namespace (not proof that it is the redirector).
	PID                    int      `json:"pid,omitempty"`
	PIDExistsHere          bool     `json:"pid_exists_here"`
	HeartbeatSecondsAgo    *float64 `json:"heartbeat_seconds_ago,omitempty"`
	LastFullSyncSecondsAgo *float64 `json:"last_full_sync_seconds_ago,omitempty"`
}

// ProgramStatus is one pinned link and the program it runs.
type ProgramStatus struct {
	Link      string `json:"link"`
	LinkID    uint32 `json:"link_id"`
	ProgramID uint32 `json:"program_id"`
	CgroupID  uint64 `json:"cgroup_id,omitempty"`
}

// WriteStatus is the route map write state a redirector stored in the pins.
type WriteStatus struct {
	MapFull           bool              `json:"map_full"`
	RoutesNotWritten  uint64            `json:"routes_not_written"`
	WriteErrors       map[string]uint64 `json:"write_errors"`
	UpdatedSecondsAgo float64           `json:"updated_seconds_ago"`
	KernelGrace       string            `json:"kernel_grace"`
	// PID and LastFullSyncSecondsAgo: see DaemonStatus.
	PID                    int      `json:"pid,omitempty"`
	LastFullSyncSecondsAgo *float64 `json:"last_full_sync_seconds_ago,omitempty"`
}

// DeadlineStatus is the per-PS deadlines in the kernel map: how many PS
// addresses have one, and those past it (no longer redirected to).
type DeadlineStatus struct {
	PSAddresses int      `json:"ps_addresses"`
	Lapsed      []string `json:"lapsed,omitempty"`
}

// HealthStatus is passive health as the pins show it: the hold-down the
// programs use, their counters, and the backends marked suspect.
type HealthStatus struct {
	// Hold is the hold-down the programs read; "off" when 0.
	Hold     string            `json:"hold"`
	Counters map[string]uint64 `json:"counters"`
	// Marked counts the backends in the suspect map; Avoided those of them
	// within the hold-down (connects avoid them while another is unmarked).
	Marked  int `json:"marked"`
	Avoided int `json:"avoided_now"`
	// Suspects lists the most recently marked backends, newest first
	// (at most maxSuspectsShown).
	Suspects []SuspectBackend `json:"suspects,omitempty"`
}

// SuspectBackend is one backend of the suspect map.
type SuspectBackend struct {
	Backend          string  `json:"backend"`
	MarkedSecondsAgo float64 `json:"marked_seconds_ago"`
	WithinHoldDown   bool    `json:"within_hold_down"`
}

package registry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// Config configures a Registry.
type Config struct {
	// URL is the address of a single server in a form ParseRedisAddress
	// accepts: host:port, redis://, rediss:// or unix://. For Sentinel or
	// Cluster, use Addrs (and MasterName for Sentinel) instead.
	URL string
	// Addrs, when set, selects go-redis's universal client: several addresses
	// mean a Cluster, or a Sentinel set when MasterName is set.
	Addrs      []string
	MasterName string
	Password   string

	// Prefix is the hash tag every key shares; default "tether".
	Prefix string
	// StreamMaxLen bounds the change stream (approximately); default 100000.
	StreamMaxLen int64
	// Logger receives warnings about malformed data; nil discards them.
	Logger *slog.Logger
	// Now is the clock; default time.Now. Tests may replace it.
	Now func() time.Time
	// Control, when set, runs on every Redis socket after socket() and
	// before connect() (net.Dialer.Control). The redirector marks its own
	// sockets there so that its eBPF programs never redirect them.
	Control func(network, address string, c syscall.RawConn) error
}

// Registry is the Redis-backed route registry. It is safe for concurrent use.
type Registry struct {
	rdb    redis.UniversalClient
	keys   keys
	maxLen int64
	log    *slog.Logger
	now    func() time.Time
	// claims holds, per PS id this Registry claimed (ClaimPS), the nonce
	// that guards every later write for that id (RenewPS, Publish,
	// Release, WithdrawAll, Forget).
	claims sync.Map
	// generations holds, per claimed PS id, the registry generation its
	// last lease write saw: a change means Redis lost data in between.
	generations sync.Map
}

// Timeouts of every Redis connection. A caller's ctx deadline, when
// earlier, bounds a call further (see newClient).
const (
	dialTimeout = 2 * time.Second
	ioTimeout   = 3 * time.Second
)

// New connects to Redis as cfg says. It does not wait for Redis to be
// reachable: a registry outlives Redis restarts, and every call reports its
// own error.
func New(cfg Config) (*Registry, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "tether"
	}
	if strings.ContainsAny(cfg.Prefix, "{}: ") {
		return nil, fmt.Errorf("registry prefix %q: must not contain braces, colons or blanks", cfg.Prefix)
	}
	if cfg.StreamMaxLen <= 0 {
		cfg.StreamMaxLen = 100000
	}
	if cfg.Logger == nil {
		// Silence is the default: the embedding program decides where
		// logs go, never a process-wide default it did not ask for.
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	rdb, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	quietRedis()
	return &Registry{rdb: rdb, keys: newKeys(cfg.Prefix), maxLen: cfg.StreamMaxLen, log: cfg.Logger, now: cfg.Now}, nil
}

// newClient builds the go-redis client cfg names. Both kinds set
// ContextTimeoutEnabled: without it go-redis drops the caller's ctx for
// socket reads and writes (only the 3s I/O timeouts apply), so a ctx
// deadline would not bound a call to a Redis that stopped answering. With
// it, a socket deadline is the earlier of the ctx deadline and the I/O
// timeout; a ctx cancelled without a deadline still does not interrupt a
// command already on the wire.
func newClient(cfg Config) (redis.UniversalClient, error) {
	switch {
	case cfg.URL != "" && len(cfg.Addrs) > 0:
		return nil, errors.New("registry: set either a Redis URL or addresses, not both")
	case cfg.URL != "":
		opt, err := ParseRedisAddress(cfg.URL)
		if err != nil {
			return nil, err
		}
		if cfg.Password != "" {
			opt.Password = cfg.Password
		}
		opt.DialTimeout = dialTimeout
		opt.ReadTimeout = ioTimeout
		opt.WriteTimeout = ioTimeout
		opt.ContextTimeoutEnabled = true
		opt.MaxRetries = 1
		opt.Dialer = dialer(cfg.Control, opt.TLSConfig)
		return redis.NewClient(opt), nil
	case len(cfg.Addrs) > 0:
		return redis.NewUniversalClient(&redis.UniversalOptions{
			Addrs: cfg.Addrs, MasterName: cfg.MasterName, Password: cfg.Password,
			DialTimeout: dialTimeout, ReadTimeout: ioTimeout, WriteTimeout: ioTimeout,
			ContextTimeoutEnabled: true,
			MaxRetries:            1,
			Dialer:                dialer(cfg.Control, nil),
		}), nil
	default:
		return nil, errors.New("registry: no Redis URL or addresses given")
	}
}

// RedisAddressForms is the one-line list of the forms ParseRedisAddress
// accepts, for error messages and flag help.
const RedisAddressForms = "host:port, redis://[user:password@]host:port[/db], rediss://... (TLS) or unix:///path/to/redis.sock[?db=N]"

// ParseRedisAddress parses the address of one Redis server: a bare
// host:port (database 0, no TLS), or a redis://, rediss:// or unix:// URL.
// Its errors say which forms it accepts, and never repeat a password the
// address holds.
func ParseRedisAddress(addr string) (*redis.Options, error) {
	shown := redactRedisAddress(addr)
	if strings.TrimSpace(addr) == "" {
		return nil, fmt.Errorf("redis address is empty: want %s", RedisAddressForms)
	}
	if !strings.Contains(addr, "://") {
		// host:port, the form redis-cli -h/-p users think in. ":6379"
		// means localhost, as in redis://:6379.
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("redis address %q: want %s", shown, RedisAddressForms)
		}
		if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
			return nil, fmt.Errorf("redis address %q: port %q is not a number from 1 to 65535", shown, port)
		}
		addr = "redis://" + net.JoinHostPort(host, port)
	}
	scheme, _, _ := strings.Cut(addr, "://")
	switch scheme {
	case "redis", "rediss", "unix":
	default:
		return nil, fmt.Errorf("redis address %q: scheme %q is not redis, rediss or unix: want %s", shown, scheme, RedisAddressForms)
	}
	opt, err := redis.ParseURL(addr)
	if err != nil {
		return nil, fmt.Errorf("redis address %q: %s: want %s", shown, strings.TrimPrefix(err.Error(), "redis: "), RedisAddressForms)
	}
	return opt, nil
}

// redactRedisAddress hides the user information of a URL-form address, so
// that an error message never carries a password.
func redactRedisAddress(addr string) string {
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok {
		return addr
	}
	// The user information ends at the last '@' before the path.
	authority, path, _ := strings.Cut(rest, "/")
	at := strings.LastIndex(authority, "@")
	if at < 0 {
		return addr
	}
	redacted := scheme + "://xxxxx@" + authority[at+1:]
	if len(rest) > len(authority) {
		redacted += "/" + path
	}
	return redacted
}

// dialer is go-redis's default dialer (timeout, keep-alive, TLS when
// tlsConf is set) with control run on each socket before it connects; nil
// (go-redis's own default) when control is nil.
func dialer(control func(string, string, syscall.RawConn) error, tlsConf *tls.Config) func(context.Context, string, string) (net.Conn, error) {
	if control == nil {
		return nil
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second, Control: control}
		if tlsConf == nil {
			return d.DialContext(ctx, network, addr)
		}
		return (&tls.Dialer{NetDialer: d, Config: tlsConf}).DialContext(ctx, network, addr)
	}
}

// Close closes the Redis connections.
func (r *Registry) Close() error { return r.rdb.Close() }

// Ping checks that Redis answers.
func (r *Registry) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("ping redis: %w", err)
	}
	return nil
}

// UsedMemory is the Redis server's INFO used_memory, in bytes: what the
// registry occupies (with anything else that server holds), for sizing.
func (r *Registry) UsedMemory(ctx context.Context) (int64, error) {
	info, err := r.rdb.Info(ctx, "memory").Result()
	if err != nil {
		return 0, fmt.Errorf("redis INFO memory: %w", err)
	}
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("%w: INFO memory has no used_memory", ErrBadData)
}

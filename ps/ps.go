package ps

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/registry"
	"github.com/tether-net/tether/tunnel"
)

// Config configures a PS node.
type Config struct {
	ID           string   `yaml:"id" flag:"id" usage:"this PS's id, unique in the pool"`
	Listen       string   `yaml:"listen" flag:"listen" usage:"address to accept agents' tunnels on"`
	Advertise    []string `yaml:"advertise" flag:"advertise" usage:"IP clients reach this PS at; data ports listen on it (repeat for several: ports are allocated across all of them)"`
	Ports        string   `yaml:"ports" flag:"ports" usage:"range of data ports, LO-HI, on every advertise address"`
	DataPlane    string   `yaml:"data-plane" flag:"data-plane" usage:"how data ports accept: sk_lookup (one socket, a BPF program steers every assigned address:port to it), listeners (a socket per port) or auto (sk_lookup where it loads, else listeners)"`
	Redis        string   `yaml:"redis" flag:"redis" usage:"the route registry: host:port, redis://, rediss:// or unix:// URL"`
	RedisPrefix  string   `yaml:"redis-prefix" flag:"redis-prefix" usage:"key prefix (hash tag) of the registry in Redis"`
	TokenFile    string   `yaml:"token-file" flag:"token-file" usage:"file of agent credentials, one 'TOKEN AGENT_IDS [CIDRS]' per line (see the README)"`
	Insecure     bool     `yaml:"insecure" flag:"insecure" usage:"accept agents without any credential (no token file, no client CA); for experiments only"`
	AllowClients []string `yaml:"allow-clients" flag:"allow-clients" usage:"CIDRs allowed to connect to data ports (empty = any)"`
	AgentCIDRs   []string `yaml:"agent-cidrs" flag:"agent-cidrs" usage:"CIDRs agents may expose endpoints in (empty = any public address); loopback, link-local and other special ranges only when named here"`
	Metrics      string   `yaml:"metrics" flag:"metrics" usage:"address to serve /metrics and /healthz on (empty = off)"`
	TLSCert      string   `yaml:"tls-cert" flag:"tls-cert" usage:"PEM certificate of the tunnel listener (enables TLS)"`
	TLSKey       string   `yaml:"tls-key" flag:"tls-key" usage:"PEM private key of --tls-cert"`
	TLSCA        string   `yaml:"tls-ca" flag:"tls-ca" usage:"PEM CA bundle; when set, agents must present a client certificate it signed"`

	Lease            time.Duration `yaml:"lease" flag:"lease" usage:"lease of this PS's routes in the registry"`
	Renew            time.Duration `yaml:"renew" flag:"renew" usage:"how often the lease is renewed"`
	Quarantine       time.Duration `yaml:"quarantine" flag:"quarantine" usage:"how long a released port stays unused (> lease + readers' resync)"`
	DrainTimeout     time.Duration `yaml:"drain-timeout" flag:"drain-timeout" usage:"how long a drain waits for in-flight connections"`
	HandshakeTimeout time.Duration `yaml:"handshake-timeout" flag:"handshake-timeout" usage:"deadline of an agent's handshake"`
	MaxHandshakes    int           `yaml:"max-handshakes" flag:"max-handshakes" usage:"handshakes in progress at once; more are refused as busy"`
	HandshakeRate    float64       `yaml:"handshake-rate" flag:"handshake-rate" usage:"new handshakes per second (burst = max-handshakes); 0 = unbounded"`
	StreamWindow     int           `yaml:"stream-window" flag:"stream-window" usage:"yamux receive window per stream, bytes"`
	TunnelDeadAfter  time.Duration `yaml:"tunnel-dead-after" flag:"tunnel-dead-after" usage:"close a tunnel whose agent sent nothing (not even a ping answer) for this long"`
	PreambleTimeout  time.Duration `yaml:"preamble-timeout" flag:"preamble-timeout" usage:"deadline for TLS, the preamble and the Hello of a new tunnel"`
	SourceHandshakes int           `yaml:"source-handshakes" flag:"source-handshakes" usage:"handshakes in progress at once from one source address"`
	CredTunnels      int           `yaml:"credential-tunnels" flag:"credential-tunnels" usage:"tunnels one credential may hold on this PS"`
	CredEndpoints    int           `yaml:"credential-endpoints" flag:"credential-endpoints" usage:"endpoints one credential may expose on this PS (0 = half the port range)"`
	MaxConnsPerPort  int           `yaml:"max-conns-per-port" flag:"max-conns-per-port" usage:"client connections carried at once on one data port"`
	MaxConns         int           `yaml:"max-conns" flag:"max-conns" usage:"client connections carried at once on all data ports"`
	IdleTimeout      time.Duration `yaml:"idle-timeout" flag:"idle-timeout" usage:"close a client connection idle both ways this long (0 = never)"`
	Resync           time.Duration `yaml:"resync" flag:"resync" usage:"how often the PS checks its routes in the registry and repairs them"`
	Intent           string        `yaml:"intent" flag:"intent" usage:"check the intent carried in redirected clients' SYNs: off, verify (default) or require"`

	// The pooled data path (pool.go).
	DataPath      string        `yaml:"data-path" flag:"data-path" usage:"how client connections reach the agent: mux (the tunnel's streams only), pool (a pooled data connection, waiting up to --pool-wait for one) or auto (a pooled one when idle, else the tunnel)"`
	PoolListen    string        `yaml:"pool-listen" flag:"pool-listen" usage:"address to accept agents' pooled data connections on (the default :0 takes a free port, which the grant names; give a fixed port where a firewall must open it; empty = no pool)"`
	PoolAdvertise string        `yaml:"pool-advertise" flag:"pool-advertise" usage:"IP:port agents dial the pool listener at (default: the address the agent reached the tunnel listener at, with --pool-listen's port)"`
	PoolWait      time.Duration `yaml:"pool-wait" flag:"pool-wait" usage:"with --data-path pool, how long a client connection waits for an idle data connection before it takes the tunnel"`
	PoolSize      int           `yaml:"pool-size" flag:"pool-size" usage:"idle data connections kept per agent session at most"`

	// Logger, Registerer and Now are set by code, not by flags.
	Logger     *slog.Logger          `yaml:"-"`
	Registerer prometheus.Registerer `yaml:"-"`
	// Registry, when set, is used instead of connecting to Redis; the PS
	// does not close it.
	Registry *registry.Registry `yaml:"-"`
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Listen:           ":7000",
		Ports:            "20000-29999",
		DataPlane:        DataPlaneAuto,
		Redis:            "redis://127.0.0.1:6379/0",
		RedisPrefix:      "tether",
		Lease:            5 * time.Second,
		Renew:            time.Second,
		Quarantine:       120 * time.Second,
		DrainTimeout:     15 * time.Second,
		HandshakeTimeout: 10 * time.Second,
		MaxHandshakes:    64,
		HandshakeRate:    500,
		StreamWindow:     tunnel.DefaultStreamWindow,
		TunnelDeadAfter:  tunnel.DefaultDeadAfter,
		PreambleTimeout:  3 * time.Second,
		SourceHandshakes: 8,
		CredTunnels:      256,
		MaxConnsPerPort:  4096,
		MaxConns:         65536,
		Resync:           10 * time.Second,
		Intent:           IntentVerify,
		DataPath:         DataPathAuto,
		PoolListen:       ":0",
		PoolWait:         200 * time.Millisecond,
		PoolSize:         16,
	}
}

// Validate checks the configuration and names what is wrong.
func (c *Config) Validate() error {
	var errs []error
	if err := ident.Valid(c.ID); err != nil {
		errs = append(errs, fmt.Errorf("--id: %w", err))
	}
	if _, err := registry.ParseRedisAddress(c.Redis); err != nil {
		errs = append(errs, fmt.Errorf("--redis: %w", err))
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("--listen %q: %w", c.Listen, err))
	}
	if _, err := parseAdvertise(c.Advertise); err != nil {
		errs = append(errs, err)
	}
	if _, err := ParsePortRange(c.Ports); err != nil {
		errs = append(errs, fmt.Errorf("--ports: %w", err))
	}
	switch c.DataPlane {
	case DataPlaneAuto, DataPlaneSKLookup, DataPlaneListeners:
	default:
		errs = append(errs, fmt.Errorf("--data-plane %q: want %s, %s or %s", c.DataPlane, DataPlaneAuto, DataPlaneSKLookup, DataPlaneListeners))
	}
	if c.Redis == "" && c.Registry == nil {
		errs = append(errs, errors.New("--redis is required"))
	}
	if _, err := cidr.Parse(c.AllowClients); err != nil {
		errs = append(errs, fmt.Errorf("--allow-clients: %w", err))
	}
	if _, err := cidr.Parse(c.AgentCIDRs); err != nil {
		errs = append(errs, fmt.Errorf("--agent-cidrs: %w", err))
	}
	if c.Lease <= 0 || c.Renew <= 0 || c.Renew*2 > c.Lease {
		errs = append(errs, fmt.Errorf("--renew %v and --lease %v: want 0 < 2*renew <= lease", c.Renew, c.Lease))
	}
	if c.Quarantine <= c.Lease {
		errs = append(errs, fmt.Errorf("--quarantine %v must exceed --lease %v (plus readers' resync)", c.Quarantine, c.Lease))
	}
	if c.DrainTimeout < 0 || c.HandshakeTimeout <= 0 || c.Resync <= 0 {
		errs = append(errs, errors.New("--drain-timeout, --handshake-timeout and --resync must be positive"))
	}
	if c.MaxHandshakes <= 0 || c.HandshakeRate < 0 {
		errs = append(errs, errors.New("--max-handshakes must be positive and --handshake-rate not negative"))
	}
	if c.PreambleTimeout <= 0 || c.PreambleTimeout > c.HandshakeTimeout {
		errs = append(errs, fmt.Errorf("--preamble-timeout %v: want positive and at most --handshake-timeout %v", c.PreambleTimeout, c.HandshakeTimeout))
	}
	if c.SourceHandshakes <= 0 || c.CredTunnels <= 0 || c.CredEndpoints < 0 {
		errs = append(errs, errors.New("--source-handshakes and --credential-tunnels must be positive, --credential-endpoints not negative"))
	}
	if c.MaxConnsPerPort <= 0 || c.MaxConns <= 0 || c.IdleTimeout < 0 {
		errs = append(errs, errors.New("--max-conns-per-port and --max-conns must be positive, --idle-timeout not negative"))
	}
	if c.StreamWindow < 256<<10 || c.StreamWindow > 1<<30 {
		errs = append(errs, fmt.Errorf("--stream-window %d: want 256 KiB to 1 GiB", c.StreamWindow))
	}
	if c.TunnelDeadAfter < tunnel.MinDeadAfter {
		errs = append(errs, fmt.Errorf("--tunnel-dead-after %v: want at least %v", c.TunnelDeadAfter, tunnel.MinDeadAfter))
	}
	if err := validIntentMode(c.Intent); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.validDataPath()...)
	if (c.TLSCert == "") != (c.TLSKey == "") || (c.TLSCA != "" && c.TLSCert == "") {
		errs = append(errs, errors.New("--tls-cert and --tls-key go together, and --tls-ca needs them"))
	}
	return errors.Join(errs...)
}

// The data planes --data-plane names.
const (
	DataPlaneAuto      = "auto"
	DataPlaneSKLookup  = "sk_lookup"
	DataPlaneListeners = "listeners"
)

// maxAdvertise bounds --advertise: four addresses already hold about
// 250,000 endpoints, and every address is a row of the steering map's key
// space and of the reserved set.
const maxAdvertise = 16

// parseAdvertise parses the advertise addresses: at least one, each an IP
// clients can reach (not unspecified), none twice.
func parseAdvertise(list []string) ([]netip.Addr, error) {
	if len(list) == 0 {
		return nil, errors.New("--advertise: want the IP clients reach this PS at (repeat it for several)")
	}
	if len(list) > maxAdvertise {
		return nil, fmt.Errorf("--advertise: %d addresses, at most %d", len(list), maxAdvertise)
	}
	out := make([]netip.Addr, 0, len(list))
	for _, s := range list {
		a, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil || a.IsUnspecified() || a.Zone() != "" {
			return nil, fmt.Errorf("--advertise %q: want an IP clients reach this PS at", s)
		}
		a = a.Unmap()
		if slices.Contains(out, a) {
			return nil, fmt.Errorf("--advertise %s given twice", a)
		}
		out = append(out, a)
	}
	return out, nil
}

// PS is a proxy server node: it accepts agents' tunnels, serves a PS
// address and port per exposed endpoint, carries each client connection over the owning
// agent's tunnel, and keeps the registry's view of its routes alive.
type PS struct {
	cfg      Config
	log      *slog.Logger
	reg      *registry.Registry
	ownReg   bool
	tls      *tls.Config
	auth     *authorizer
	quotas   *quotas
	exposure *exposure
	gate     *gate
	sources  *sourceLimit
	alloc    *portAllocator
	plane    dataPlane
	m        *psMetrics
	// advertise are the addresses clients reach this PS at, the lease's
	// primary first.
	advertise []netip.Addr
	allow     cidr.List
	window    uint32

	lnMu sync.Mutex
	ln   net.Listener
	// poolLn accepts pooled data connections (nil without a pool); pools
	// holds the idle ones per session (pool.go).
	poolLn net.Listener
	pools  *poolSet
	addr   chan net.Addr // receives the bound tunnel address once

	mu       sync.Mutex
	agents   map[string]*agentSlot
	sessions map[*psSession]struct{}
	nextSess uint64

	bmu      sync.RWMutex
	bindings map[netip.AddrPort]*binding

	draining atomic.Bool
	inflight atomic.Int64 // client connections being carried
	conns    atomic.Int64 // goroutines serving tunnels and handshakes
	closed   chan struct{}
	refusing atomic.Int32 // goroutines answering "busy"

	// nonce names this instance in its lease (see claim); leaseLost is set
	// once another instance has taken the id over.
	nonce     string
	leaseLost atomic.Bool

	// renewedAt is when the lease was last written (claim or renewal),
	// renewTriedAt when a renewal last finished either way: unix nanos,
	// zero before the first. /readyz reads the first, /healthz the second.
	renewedAt    atomic.Int64
	renewTriedAt atomic.Int64
}

// New builds a PS from cfg. It does not listen yet: Run does.
func New(cfg Config) (*PS, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	log := cfg.Logger.With("ps_id", cfg.ID)
	pr, _ := ParsePortRange(cfg.Ports)
	advertise, _ := parseAdvertise(cfg.Advertise)
	allow, _ := cidr.Parse(cfg.AllowClients)
	agentNets, _ := cidr.Parse(cfg.AgentCIDRs)
	tlsCfg, err := tunnel.ServerTLSConfig(tunnel.TLSFiles{Cert: cfg.TLSCert, Key: cfg.TLSKey, CA: cfg.TLSCA})
	if err != nil {
		return nil, err
	}
	auth, err := loadAuthorizer(&cfg, cliconfig.TokenEnv)
	if err != nil {
		return nil, err
	}
	credEndpoints := cfg.CredEndpoints
	if credEndpoints == 0 {
		credEndpoints = max(1, len(advertise)*pr.Size()/2)
	}
	m, err := newPSMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	p := &PS{
		cfg: cfg, log: log, tls: tlsCfg, auth: auth, m: m,
		gate:      newGate(cfg.MaxHandshakes, cfg.HandshakeRate, cfg.MaxHandshakes, nil),
		sources:   newSourceLimit(cfg.SourceHandshakes),
		quotas:    newQuotas(cfg.CredTunnels, credEndpoints),
		exposure:  newExposure(agentNets),
		alloc:     newPortAllocator(advertise, pr, nil),
		advertise: advertise,
		allow:     allow,
		window:    uint32(cfg.StreamWindow),
		addr:      make(chan net.Addr, 1),
		agents:    map[string]*agentSlot{},
		sessions:  map[*psSession]struct{}{},
		bindings:  map[netip.AddrPort]*binding{},
		closed:    make(chan struct{}),
		pools:     newPoolSet(),
	}
	if p.plane, err = p.newDataPlane(len(advertise) * pr.Size()); err != nil {
		return nil, err
	}
	for _, plane := range []string{DataPlaneSKLookup, DataPlaneListeners} {
		p.m.dataPlane.WithLabelValues(plane).Set(0)
	}
	p.m.dataPlane.WithLabelValues(p.plane.Name()).Set(1)
	p.m.portsCapacity.Set(float64(len(advertise) * pr.Size()))
	if err := registerPoolIdle(cfg.Registerer, p.pools); err != nil {
		_ = p.plane.Close()
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	if err := registerSteering(cfg.Registerer, p.plane); err != nil {
		_ = p.plane.Close()
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	p.reg = cfg.Registry
	if p.reg == nil {
		p.reg, err = registry.New(registry.Config{URL: cfg.Redis, Prefix: cfg.RedisPrefix, Logger: log})
		if err != nil {
			_ = p.plane.Close()
			return nil, err
		}
		p.ownReg = true
	}
	return p, nil
}

// Addr returns the address the tunnel listener is bound to, waiting for
// Run to bind it or ctx to end.
func (p *PS) Addr(ctx context.Context) (net.Addr, error) {
	select {
	case a := <-p.addr:
		p.addr <- a
		return a, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Run cleans up what an earlier run of this PS left in the registry,
// accepts tunnels, and keeps the lease until ctx ends; then it drains
// (withdraws routes, stops accepting, waits for in-flight connections) and
// returns.
func (p *PS) Run(ctx context.Context) error {
	if p.auth.insecure {
		p.m.insecure.Set(1)
		p.log.Warn("running with --insecure: agents without a credential are accepted")
	}
	if err := p.start(ctx); err != nil {
		return err
	}
	regAddrs := registryAddrs(ctx, p.cfg.Redis)
	p.exposure.reserve(p.reservedAddrs(ctx, regAddrs))
	ln, err := net.Listen("tcp", p.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen for tunnels on %s: %w", p.cfg.Listen, err)
	}
	poolLn, err := p.listenPool()
	if err != nil {
		_ = ln.Close()
		return err
	}
	p.lnMu.Lock()
	p.ln = ln
	p.poolLn = poolLn
	p.lnMu.Unlock()
	p.logPool(poolLn)
	p.addr <- ln.Addr()
	p.log.Info("ps running", "listen", ln.Addr().String(), "advertise", addrStrings(p.advertise),
		"ports", p.cfg.Ports, "data_plane", p.plane.Name(), "tls", p.tls != nil, "client_certs", p.cfg.TLSCA != "")

	// Registry calls made for tunnels (publish, release) use life: it
	// carries ctx's values but ends only when Run returns, after the drain,
	// so that releases during the drain still reach the registry.
	life, endLife := context.WithCancel(context.WithoutCancel(ctx))
	defer endLife()
	loops, lctx := errgroup.WithContext(ctx)
	loops.Go(func() error { return p.acceptTunnels(life, ln) })
	if poolLn != nil {
		loops.Go(func() error { return p.acceptData(poolLn) })
	}
	// A lease taken over by another instance ends the loops with an error:
	// the drain then stops serving without touching the registry, and Run
	// returns that error so the process exits non-zero.
	loops.Go(func() error { return p.renewLoop(lctx) })
	loops.Go(func() error { p.collectLoop(lctx); return nil })
	loops.Go(func() error { p.resyncLoop(lctx); return nil })
	loops.Go(func() error { p.refreshReserved(lctx, p.cfg.Renew, regAddrs); return nil })
	loops.Go(func() error {
		<-lctx.Done()
		p.drain(life)
		return nil
	})
	err = loops.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// start claims the PS id for this instance (refusing to start while
// another live instance holds it, see claim) and removes the leftovers of
// an earlier run of this PS id, quarantining their ports, before anything
// is published.
func (p *PS) start(ctx context.Context) error {
	if err := p.claim(ctx); err != nil {
		return err
	}
	p.renewedAt.Store(time.Now().UnixNano())
	until := time.Now().Add(p.cfg.Quarantine)
	ports, err := p.reg.WithdrawAll(ctx, p.cfg.ID, until)
	if err != nil {
		return fmt.Errorf("start: clean leftovers: %w", err)
	}
	if len(ports) > 0 {
		p.log.Info("withdrew leftovers of an earlier run", "ports", len(ports), "quarantine_until", until.Format(time.RFC3339))
	}
	q, err := p.reg.Quarantined(ctx, p.cfg.ID)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	p.alloc.quarantineUntil(q)
	return nil
}

func (p *PS) acceptTunnels(ctx context.Context, ln net.Listener) error {
	acceptEach(ln, p.log, "accept tunnel", func(c net.Conn) {
		// The source's own limit comes first, so that one host's silent
		// connections cannot take the slots every other agent needs.
		source := addrPortOf(c.RemoteAddr()).Addr()
		if !p.sources.tryAcquire(source) {
			p.m.handshakes.WithLabelValues("source_busy").Inc()
			p.refuseBusy(c)
			return
		}
		if !p.gate.tryAcquire() {
			p.sources.release(source)
			p.m.handshakes.WithLabelValues(tunnel.CodeBusy.String()).Inc()
			p.refuseBusy(c)
			return
		}
		p.conns.Add(1)
		go func() {
			defer p.conns.Add(-1)
			p.serveTunnel(ctx, c, source)
		}()
	})
	return nil
}

// refuseBusy answers "busy" without reading the Hello; a bounded number of
// these run at once, beyond which the connection is simply closed.
func (p *PS) refuseBusy(c net.Conn) {
	if p.refusing.Add(1) > 256 {
		p.refusing.Add(-1)
		_ = c.Close()
		return
	}
	go func() {
		defer p.refusing.Add(-1)
		p.log.Debug("refused tunnel", "remote", c.RemoteAddr().String(), "code", tunnel.CodeBusy.String(), "reason", "handshake limit reached")
		conn := c
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		if p.tls != nil {
			tc := tls.Server(c, p.tls)
			if tc.Handshake() != nil {
				_ = c.Close()
				return
			}
			conn = tc
		}
		p.closeRefused(conn, &tunnel.Refuse{Code: tunnel.CodeBusy, Reason: "handshake limit reached, retry later"})
	}()
}

// closeRefused sends r, then half-closes and drains briefly, so that the
// agent reads the refusal instead of a reset caused by its unread Hello.
func (p *PS) closeRefused(conn net.Conn, r *tunnel.Refuse) {
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if tunnel.WriteRefuse(conn, r) == nil {
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		buf := make([]byte, 4096)
		for n := 0; n < 2*tunnel.MaxMessageSize; {
			k, err := conn.Read(buf)
			n += k
			if err != nil {
				break
			}
		}
	}
	_ = conn.Close()
}

// Close releases what New acquired. Run drains on its own when its context
// ends; Close is for a PS whose Run never ran or has returned.
func (p *PS) Close() error {
	p.stopAccepting()
	p.closeTunnels(false)
	if p.ownReg {
		return p.reg.Close()
	}
	return nil
}

func (p *PS) renew(ctx context.Context, state registry.PSState) error {
	rctx, cancel := context.WithTimeout(ctx, p.cfg.Lease)
	defer cancel()
	// Only the duration leaves this host: Redis stamps the expiry on its
	// own clock, so a skewed clock here neither shortens nor stretches it.
	// The nonce guards the renewal: if another instance claimed the id,
	// nothing is written and the error wraps registry.ErrLeaseTaken.
	err := p.reg.RenewPS(rctx, p.lease(state))
	now := time.Now().UnixNano()
	p.renewTriedAt.Store(now)
	// A renewal that found the registry's data lost wrote the lease anew:
	// it renewed (see renewLoop).
	if err == nil || errors.Is(err, registry.ErrRegistryDataLost) {
		p.renewedAt.Store(now)
	}
	return err
}

// lease is this instance's lease as it writes it.
func (p *PS) lease(state registry.PSState) registry.PSLease {
	return registry.PSLease{ID: p.cfg.ID, Addr: p.advertise[0], Addrs: p.advertise, State: state, TTL: p.cfg.Lease, Nonce: p.nonce}
}

func addrStrings(addrs []netip.Addr) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out
}

// Readiness is nil while the PS does its job: its tunnel listener is open,
// it is not draining, and its lease was renewed within one lease (so
// readers see its backends as live). Otherwise it says every reason.
func (p *PS) Readiness() error {
	var errs []error
	p.lnMu.Lock()
	listening := p.ln != nil
	p.lnMu.Unlock()
	if !listening {
		errs = append(errs, errors.New("tunnel listener not open yet"))
	}
	if p.draining.Load() {
		errs = append(errs, errors.New("draining"))
	}
	if p.leaseLost.Load() {
		errs = append(errs, errors.New("ps id taken over by another instance"))
	}
	if at := p.renewedAt.Load(); at == 0 {
		errs = append(errs, errors.New("lease not claimed yet"))
	} else if since := time.Since(time.Unix(0, at)); since > p.cfg.Lease {
		errs = append(errs, fmt.Errorf("lease last renewed %v ago, longer than the lease (%v): readers may count this ps dead", since.Round(time.Millisecond), p.cfg.Lease))
	}
	return errors.Join(errs...)
}

// Health is nil unless the lease loop is stuck: it tries a renewal every
// --renew, each bounded by the lease, so no attempt finishing for several
// leases means it no longer runs (a failing registry is not stuck, and is
// not a reason to restart: the attempts go on). A draining PS stops
// renewing on purpose and stays healthy.
func (p *PS) Health() error {
	if p.draining.Load() {
		return nil
	}
	at := p.renewTriedAt.Load()
	if at == 0 {
		return nil // not started yet: the claim is still being retried
	}
	limit := max(3*(p.cfg.Lease+p.cfg.Renew), 10*time.Second)
	if since := time.Since(time.Unix(0, at)); since > limit {
		return fmt.Errorf("lease loop stuck: no renewal attempt finished for %v (limit %v)", since.Round(time.Millisecond), limit)
	}
	return nil
}

// Reload re-reads the token file (SIGHUP): tunnels handshaking from now on
// are checked against the new tokens; tunnels already up keep running.
// A file that does not parse is refused and the tokens in force stay.
func (p *PS) Reload(context.Context) (string, error) {
	return p.auth.reload(p.cfg.TokenFile)
}

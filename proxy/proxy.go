package proxy

import (
	"bufio"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/internal/relay"
	"github.com/tether-net/tether/registry"
)

// Errors of a target lookup; each maps to its own SOCKS5 reply and HTTP
// status.
var (
	ErrNoRoute       = errors.New("no route to this target")
	ErrNoLiveBackend = errors.New("the target's route has no live backend")
	ErrRefused       = errors.New("every live backend refused the connection")
	ErrResolve       = errors.New("cannot resolve the target name")
)

// Lookup is the route table the proxy reads: registry.Mirror.
type Lookup interface {
	Lookup(target netip.AddrPort) ([]registry.BackendState, bool)
}

// Proxy is the SOCKS5 and HTTP proxy daemon.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	routes  Lookup
	mirror  *registry.Mirror // nil when routes was injected
	reg     *registry.Registry
	allow   cidr.List
	pass    passthroughPolicy
	users   map[string]string
	metrics metrics

	// dialControl, when set, vets every address dialed (tests keep their
	// traffic on loopback with it, even when a check fails).
	dialControl func(network, address string, c syscall.RawConn) error

	mu        sync.Mutex
	listeners map[string]net.Addr
	ready     chan struct{}
}

type metrics struct {
	requests *prometheus.CounterVec
	rejected prometheus.Counter
	open     prometheus.Gauge
	// passRefused counts targets --passthrough refused, by reason.
	passRefused *prometheus.CounterVec
}

// New builds the proxy and its registry mirror.
func New(cfg Config) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	reg, err := registry.New(registry.Config{URL: cfg.Redis, Prefix: cfg.RedisPrefix, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	mirror, err := registry.NewMirror(registry.MirrorConfig{Registry: reg, Resync: cfg.Resync, Logger: cfg.Logger, Metrics: cfg.Registerer})
	if err != nil {
		reg.Close()
		return nil, err
	}
	p, err := newWithLookup(cfg, mirror)
	if err != nil {
		reg.Close()
		return nil, err
	}
	p.mirror, p.reg = mirror, reg
	return p, nil
}

// newWithLookup builds a proxy over any route table (tests).
func newWithLookup(cfg Config, routes Lookup) (*Proxy, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	allow, err := cidr.Parse(cfg.AllowClients)
	if err != nil {
		return nil, err
	}
	passAllow, err := cidr.Parse(cfg.PassthroughCIDRs)
	if err != nil {
		return nil, err
	}
	p := &Proxy{cfg: cfg, log: cfg.Logger, routes: routes, allow: allow, listeners: map[string]net.Addr{}, ready: make(chan struct{})}
	p.pass = passthroughPolicy{allow: passAllow, host: newHostAddrs()}
	if cfg.AuthFile != "" {
		if p.users, err = readUsers(cfg.AuthFile); err != nil {
			return nil, err
		}
	}
	p.metrics = metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_proxy_requests_total", Help: "Proxy requests by protocol and result."}, []string{"protocol", "result"}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_proxy_clients_rejected_total", Help: "Connections closed because their source is outside --allow-clients."}),
		open:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_proxy_connections_open", Help: "Proxied connections currently open."}),
		passRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_proxy_passthrough_refused_total",
			Help: "Targets without a route that --passthrough refused to dial, by reason (loopback, link_local, unspecified, multicast, broadcast, own_address, outside_cidrs, host_addresses_unknown)."}, []string{"reason"}),
	}
	// Every reason is exported from the start, at zero.
	for _, r := range passthroughReasons {
		p.metrics.passRefused.WithLabelValues(r)
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{p.metrics.requests, p.metrics.rejected, p.metrics.open, p.metrics.passRefused} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register proxy metrics: %w", err)
			}
		}
	}
	return p, nil
}

// readUsers reads user:password lines.
func readUsers(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read auth file: %w", err)
	}
	users := map[string]string{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		u, pw, ok := strings.Cut(line, ":")
		if !ok || u == "" || len(u) > 255 || len(pw) > 255 {
			return nil, fmt.Errorf("auth file %s line %d: want user:password (each 1-255 bytes)", path, i+1)
		}
		users[u] = pw
	}
	if len(users) == 0 {
		return nil, fmt.Errorf("auth file %s holds no user", path)
	}
	return users, nil
}

func (p *Proxy) checkUser(user, pass string) bool {
	want, ok := p.users[user]
	// Compare even for an unknown user, so timing does not tell users apart.
	eq := subtle.ConstantTimeCompare([]byte(want), []byte(pass)) == 1
	return ok && eq
}

// Addr returns the bound address of the "socks" or "http" listener once
// Run has opened it.
func (p *Proxy) Addr(ctx context.Context, which string) (net.Addr, error) {
	select {
	case <-p.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	a, ok := p.listeners[which]
	if !ok {
		return nil, fmt.Errorf("no %s listener", which)
	}
	return a, nil
}

// Run serves until ctx ends.
func (p *Proxy) Run(ctx context.Context) error {
	eg, ctx := errgroup.WithContext(ctx)
	if p.mirror != nil {
		eg.Go(func() error { return p.mirror.Run(ctx) })
	}
	var lns []net.Listener
	for _, l := range []struct{ name, addr string }{{"socks", p.cfg.Socks}, {"http", p.cfg.HTTP}} {
		if l.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err == nil {
			lns = append(lns, ln)
			err = p.cfg.checkExposure("--"+l.name, ln.Addr().String(), len(p.allow) > 0)
		}
		if err != nil {
			for _, o := range lns {
				o.Close()
			}
			return fmt.Errorf("listen %s on %s: %w", l.name, l.addr, err)
		}
		p.mu.Lock()
		p.listeners[l.name] = ln.Addr()
		p.mu.Unlock()
		p.log.Info("proxy listening", "protocol", l.name, "addr", ln.Addr().String())
		serve := p.serveSOCKS
		if l.name == "http" {
			serve = p.serveHTTP
		}
		eg.Go(func() error { return serve(ctx, p.filter(ln)) })
	}
	close(p.ready)
	eg.Go(func() error {
		<-ctx.Done()
		for _, ln := range lns {
			ln.Close()
		}
		return nil
	})
	return eg.Wait()
}

// Readiness is nil once the proxy does its job: its listeners are open
// and its mirror of the registry holds a first full load (before it, every
// routed target would be refused as having no route). Otherwise it says
// what is missing.
func (p *Proxy) Readiness() error {
	var errs []error
	select {
	case <-p.ready:
	default:
		errs = append(errs, errors.New("listeners not open yet"))
	}
	if p.mirror != nil {
		select {
		case <-p.mirror.Ready():
		default:
			errs = append(errs, errors.New("route mirror not loaded yet: no full load of the registry has succeeded"))
		}
	}
	return errors.Join(errs...)
}

// Close releases the registry connection.
func (p *Proxy) Close() error {
	if p.reg != nil {
		return p.reg.Close()
	}
	return nil
}

// filter wraps ln so that connections from outside --allow-clients are
// closed at accept.
func (p *Proxy) filter(ln net.Listener) net.Listener {
	if len(p.allow) == 0 {
		return ln
	}
	return &allowListener{Listener: ln, p: p}
}

type allowListener struct {
	net.Listener
	p *Proxy
}

func (a *allowListener) Accept() (net.Conn, error) {
	for {
		c, err := a.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil && a.p.allow.Contains(ap.Addr()) {
			return c, nil
		}
		a.p.metrics.rejected.Inc()
		a.p.log.Warn("client outside --allow-clients refused", "client", c.RemoteAddr().String())
		c.Close()
	}
}

// resolve turns host (an IP literal or a name) and port into targets.
func resolve(ctx context.Context, host string, port uint16) ([]netip.AddrPort, error) {
	if a, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return []netip.AddrPort{netip.AddrPortFrom(a.Unmap(), port)}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil || len(addrs) == 0 {
		return nil, fmt.Errorf("%w %q: %v", ErrResolve, host, err)
	}
	out := make([]netip.AddrPort, len(addrs))
	for i, a := range addrs {
		out[i] = netip.AddrPortFrom(a.Unmap(), port)
	}
	return out, nil
}

// dial connects to the first of targets that has a route (or, with
// --passthrough, to the targets themselves), trying each live backend in
// random order until one accepts.
func (p *Proxy) dial(ctx context.Context, targets []netip.AddrPort) (net.Conn, netip.AddrPort, error) {
	d := net.Dialer{Timeout: p.cfg.DialTimeout, Control: p.dialControl}
	for _, t := range targets {
		backends, ok := p.routes.Lookup(t)
		if !ok {
			continue
		}
		var live []registry.BackendState
		for _, b := range backends {
			if b.Live && !b.Draining {
				live = append(live, b)
			}
		}
		if len(live) == 0 {
			return nil, t, fmt.Errorf("%s: %w", t, ErrNoLiveBackend)
		}
		rand.Shuffle(len(live), func(i, j int) { live[i], live[j] = live[j], live[i] })
		var errs []error
		for _, b := range live {
			c, err := d.DialContext(ctx, "tcp", b.Address.String())
			if err == nil {
				return c, t, nil
			}
			p.log.Debug("backend refused, trying the next", "target", t.String(), "ps_id", b.PSID, "err", err)
			errs = append(errs, err)
		}
		return nil, t, fmt.Errorf("%s: %w: %w", t, ErrRefused, errors.Join(errs...))
	}
	if p.cfg.Passthrough && len(targets) > 0 {
		return p.dialPassthrough(ctx, &d, targets)
	}
	if len(targets) == 0 {
		return nil, netip.AddrPort{}, ErrNoRoute
	}
	return nil, targets[0], fmt.Errorf("%s: %w", targets[0], ErrNoRoute)
}

// dialPassthrough dials targets without a route directly, in order, once
// every one of them has passed the passthrough policy: a name is refused
// when any of its addresses is, and the address dialed is the one checked
// (an IP literal: nothing is resolved again).
func (p *Proxy) dialPassthrough(ctx context.Context, d *net.Dialer, targets []netip.AddrPort) (net.Conn, netip.AddrPort, error) {
	checked := make([]netip.AddrPort, len(targets))
	for i, t := range targets {
		t = netip.AddrPortFrom(t.Addr().Unmap().WithZone(""), t.Port())
		if reason := p.pass.check(t.Addr()); reason != "" {
			p.metrics.passRefused.WithLabelValues(reason).Inc()
			return nil, t, fmt.Errorf("%s: %w: %s", t, ErrForbidden, describe(reason))
		}
		checked[i] = t
	}
	var errs []error
	for _, t := range checked {
		c, err := d.DialContext(ctx, "tcp", t.String())
		if err == nil {
			return c, t, nil
		}
		errs = append(errs, err)
	}
	return nil, checked[0], fmt.Errorf("%s (passthrough): %w: %w", checked[0], ErrRefused, errors.Join(errs...))
}

// splice carries a (the client) and b (the upstream) both ways until both
// directions end, with the half-close and reset rules of relay.Join.
// Bytes of a that aBuffered already read ahead are sent first.
func (p *Proxy) splice(a, b net.Conn, aBuffered *bufio.Reader) {
	p.metrics.open.Inc()
	defer p.metrics.open.Dec()
	client := relay.HalfClose(a)
	if aBuffered != nil && aBuffered.Buffered() > 0 {
		ahead := io.LimitReader(aBuffered, int64(aBuffered.Buffered()))
		client = readAhead{HalfCloser: client, r: io.MultiReader(ahead, client)}
	}
	_, _, _ = relay.Join(client, relay.HalfClose(b), nil, nil)
}

// readAhead is a client connection whose first bytes were read ahead into
// a buffer: reads drain r (the buffer, then the connection).
type readAhead struct {
	relay.HalfCloser
	r io.Reader
}

func (c readAhead) Read(b []byte) (int, error) { return c.r.Read(b) }

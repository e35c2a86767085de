package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/jitter"
	"github.com/tether-net/tether/internal/relay"
	"github.com/tether-net/tether/tunnel"
)

// errOnlyOnePS means every PS the agent reached already holds one of its
// tunnels: the agent keeps what it has and tries again later.
var errOnlyOnePS = errors.New("only PS nodes already holding a tunnel of this agent are reachable")

var errSessionEnded = errors.New("tunnel ended")

// headerTimeout bounds reading a stream header.
const headerTimeout = 10 * time.Second

// Agent holds tunnels to proxy servers and serves the streams they carry.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	m     *metrics
	tls   *tls.Config
	token string
	exp   []Exposure

	ip        netip.Addr
	endpoints []netip.AddrPort
	dial      map[netip.AddrPort]string

	epochBase uint64
	epochCtr  atomic.Uint64

	placeMu sync.Mutex // one handshake at a time, so held ids are accurate

	mu       sync.Mutex
	held     map[int]string // slot -> ps id
	sessions map[int]*tunnel.AgentSession
	onlyOne  bool
	ready    chan struct{}
	readyMu  sync.Once

	dialFails *dialFailures
}

// New builds an agent from cfg.
func New(cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	if cfg.LookupNetIP == nil {
		cfg.LookupNetIP = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	token := cfg.Token
	if token == "" {
		var err error
		if token, err = cliconfig.ReadSecret(cfg.TokenFile, cliconfig.TokenEnv); err != nil {
			return nil, err
		}
	}
	var tlsCfg *tls.Config
	files := tunnel.TLSFiles{Cert: cfg.TLSCert, Key: cfg.TLSKey, CA: cfg.TLSCA}
	if files.Enabled() {
		var err error
		if tlsCfg, err = tunnel.ClientTLSConfig(files, cfg.TLSServerName); err != nil {
			return nil, err
		}
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	a := &Agent{
		cfg: cfg, log: cfg.Logger.With("agent_id", cfg.ID), m: m, tls: tlsCfg, token: token,
		epochBase: uint64(time.Now().UnixNano()),
		held:      map[int]string{},
		sessions:  map[int]*tunnel.AgentSession{},
		ready:     make(chan struct{}),
		dialFails: newDialFailures(dialFailureEvery, time.Now),
	}
	for _, s := range cfg.Expose {
		e, _ := ParseExpose(s)
		a.exp = append(a.exp, e)
	}
	if cfg.IP != "" {
		a.setIP(netip.MustParseAddr(cfg.IP))
	}
	return a, nil
}

func (a *Agent) setIP(ip netip.Addr) {
	a.ip = ip.Unmap()
	a.endpoints = make([]netip.AddrPort, len(a.exp))
	a.dial = make(map[netip.AddrPort]string, len(a.exp))
	for i, e := range a.exp {
		t := netip.AddrPortFrom(a.ip, e.Port)
		a.endpoints[i] = t
		d := e.Dial
		if d == "" {
			d = t.String()
		}
		a.dial[t] = d
	}
}

// Endpoints returns the route targets the agent exposes (known once Run
// has determined the agent's IP).
func (a *Agent) Endpoints() []netip.AddrPort { return a.endpoints }

// Ready is closed once the first tunnel is up.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Readiness is nil once the agent does its job: at least one tunnel is
// up, and every endpoint it exposes was accepted by at least one PS it
// holds a tunnel on. One tunnel is enough: with fewer PS nodes than
// --tunnels the agent still serves every endpoint, without the spare
// (tether_agent_tunnels shows that). Otherwise it says what is missing.
func (a *Agent) Readiness() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.sessions) == 0 {
		return fmt.Errorf("no tunnel up yet (want %d, on distinct PS nodes)", a.cfg.Tunnels)
	}
	var errs []error
	for i, target := range a.endpoints {
		accepted := false
		var refusals []string
		for _, s := range a.sessions {
			if i >= len(s.Welcome.Endpoints) {
				continue
			}
			r := s.Welcome.Endpoints[i]
			if r.Code == tunnel.CodeOK {
				accepted = true
				break
			}
			refusals = append(refusals, fmt.Sprintf("%s: %s", s.Welcome.PSID, r.Code))
		}
		if !accepted {
			errs = append(errs, fmt.Errorf("endpoint %s accepted by no PS (refused by %v)", target, refusals))
		}
	}
	return errors.Join(errs...)
}

// HeldPS returns the ids of the PS nodes the agent holds tunnels on.
func (a *Agent) HeldPS() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]string, 0, len(a.held))
	for _, id := range a.held {
		out = append(out, id)
	}
	return out
}

// Run holds the tunnels until ctx ends, then drains each one (its PS
// withdraws the routes, streams in flight get up to DrainTimeout) and
// returns. Close during the drain ends it at once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.ip.IsValid() {
		ip, err := a.sourceIP(ctx)
		if err != nil {
			return err
		}
		a.setIP(ip)
	}
	a.log.Info("agent running", "ip", a.ip.String(), "endpoints", len(a.endpoints), "tunnels", a.cfg.Tunnels,
		"servers", a.cfg.Servers, "tls", a.tls != nil)
	g, gctx := errgroup.WithContext(ctx)
	for slot := 0; slot < a.cfg.Tunnels; slot++ {
		g.Go(func() error {
			a.runSlot(gctx, slot)
			return nil
		})
	}
	// Say at once that a stop began: the drain that follows may take up
	// to --drain-timeout, and a silent agent looks hung meanwhile.
	stopping := context.AfterFunc(ctx, func() {
		a.log.Info("agent stopping: draining its tunnels (a second SIGTERM or SIGINT ends it at once)", "drain_timeout", a.cfg.DrainTimeout)
	})
	defer stopping()
	return g.Wait()
}

// Close closes the tunnels at once (ending a drain in progress); Run
// returns once its context ends.
func (a *Agent) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, s := range a.sessions {
		_ = s.Close()
	}
	return nil
}

// sourceIP finds the address the kernel would use towards the first
// server: a UDP "connect" picks the route without sending anything.
func (a *Agent) sourceIP(ctx context.Context) (netip.Addr, error) {
	host, port, _ := net.SplitHostPort(a.cfg.Servers[0])
	ips, err := a.cfg.LookupNetIP(ctx, host)
	if err != nil || len(ips) == 0 {
		return netip.Addr{}, fmt.Errorf("find agent ip: resolve %s: %w (set --ip)", host, err)
	}
	c, err := net.Dial("udp", net.JoinHostPort(ips[0].Unmap().String(), port))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("find agent ip: route to %s: %w (set --ip)", ips[0], err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

func (a *Agent) runSlot(ctx context.Context, slot int) {
	log := a.log.With("slot", slot)
	// A slot that cannot be placed (fewer PS nodes than --tunnels) is not
	// failing: it waits on a slow schedule of its own, says so once, and
	// is not counted as a reconnect (see slotBackoff).
	bo := newSlotBackoff(a.cfg.BackoffMin, a.cfg.BackoffMax)
	keepConnected(ctx, bo, a.cfg.StableAfter,
		func(ctx context.Context) (*tunnel.AgentSession, error) { return a.connect(ctx, slot, log) },
		func(ctx context.Context, s *tunnel.AgentSession) { a.serve(ctx, slot, s, log) },
		func(err error, wait time.Duration) {
			if !errors.Is(err, errOnlyOnePS) {
				a.m.reconnects.Inc()
			}
			switch {
			case errors.Is(err, errOnlyOnePS):
				a.mu.Lock()
				first := !a.onlyOne
				a.onlyOne = true
				held := len(a.held)
				a.mu.Unlock()
				if first {
					log.Warn("fewer PS nodes reachable than --tunnels: running with fewer tunnels than wanted, retrying slowly",
						"tunnels", held, "wanted", a.cfg.Tunnels, "held_ps", a.HeldPS(), "retry_in", wait.Round(time.Millisecond))
				} else {
					log.Debug("still no PS free for this slot", "retry_in", wait.Round(time.Millisecond))
				}
			case errors.Is(err, errSessionEnded):
				log.Warn("tunnel lost, reconnecting", "retry_in", wait.Round(time.Millisecond))
			default:
				log.Warn("tunnel attempt failed", "err", err, "retry_in", wait.Round(time.Millisecond))
			}
		})
}

type candidate struct {
	addr string // ip:port to dial
	host string // the name given, for TLS verification
}

// candidates resolves every --server now (addresses change), each address
// counting as one server, in random order to spread agents over them.
func (a *Agent) candidates(ctx context.Context) ([]candidate, error) {
	var out []candidate
	var lastErr error
	for _, s := range a.cfg.Servers {
		host, port, _ := net.SplitHostPort(s)
		if ip, err := netip.ParseAddr(host); err == nil {
			out = append(out, candidate{addr: net.JoinHostPort(ip.String(), port), host: host})
			continue
		}
		ips, err := a.cfg.LookupNetIP(ctx, host)
		if err != nil {
			lastErr = fmt.Errorf("resolve %s: %w", host, err)
			continue
		}
		for _, ip := range ips {
			out = append(out, candidate{addr: net.JoinHostPort(ip.Unmap().String(), port), host: host})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no server address: %w", lastErr)
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out, nil
}

// connect fills slot with a tunnel on a PS no other slot holds. One name
// may hide several PS nodes (a VIP), so it tries a bounded number of times,
// cycling through the candidates.
func (a *Agent) connect(ctx context.Context, slot int, log *slog.Logger) (*tunnel.AgentSession, error) {
	a.placeMu.Lock()
	defer a.placeMu.Unlock()
	cands, err := a.candidates(ctx)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	held := make([]string, 0, len(a.held))
	for s, id := range a.held {
		if s != slot {
			held = append(held, id)
		}
	}
	a.mu.Unlock()
	attempts := max(6, 2*len(cands))
	dupes := 0
	var lastErr error
	for i := 0; i < attempts && ctx.Err() == nil; i++ {
		c := cands[i%len(cands)]
		s, err := a.dialOne(ctx, c, held)
		if err != nil {
			var rf *tunnel.Refuse
			if errors.As(err, &rf) && rf.Code == tunnel.CodeDuplicatePS {
				a.m.placementRefusals.Inc()
				dupes++
				continue
			}
			lastErr = fmt.Errorf("%s: %w", c.addr, err)
			if len(held) == 0 && i+1 >= len(cands) {
				break // every candidate failed once; back off
			}
			continue
		}
		id := s.Welcome.PSID
		if contains(held, id) {
			// A PS that does not honour HeldPS, or two nodes with one id.
			_ = s.Close()
			dupes++
			continue
		}
		a.mu.Lock()
		a.held[slot] = id
		a.sessions[slot] = s
		if a.onlyOne && len(a.held) == a.cfg.Tunnels {
			a.onlyOne = false
			log.Info("tunnels on distinct PS nodes restored", "held_ps", len(a.held))
		}
		a.mu.Unlock()
		a.logWelcome(log, c, s)
		a.m.tunnels.Inc()
		a.readyMu.Do(func() { close(a.ready) })
		return s, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if dupes > 0 {
		return nil, errOnlyOnePS
	}
	return nil, lastErr
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (a *Agent) dialOne(ctx context.Context, c candidate, held []string) (*tunnel.AgentSession, error) {
	d := net.Dialer{Timeout: a.cfg.ConnectTimeout, KeepAlive: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	var tlsCfg *tls.Config
	if a.tls != nil {
		tlsCfg = a.tls.Clone()
		if tlsCfg.ServerName == "" {
			tlsCfg.ServerName = c.host
		}
	}
	hello := &tunnel.Hello{
		AgentID: a.cfg.ID, AgentIP: a.ip, Token: a.token,
		Epoch:  a.epochBase + a.epochCtr.Add(1),
		HeldPS: held, Endpoints: a.endpoints,
	}
	return tunnel.Handshake(ctx, conn, hello, tunnel.ClientConfig{
		TLS: tlsCfg, Timeout: a.cfg.ConnectTimeout, Window: uint32(a.cfg.StreamWindow), Logger: a.log,
		DisableControl: a.cfg.DisableControl,
		Liveness:       tunnel.Liveness{DeadAfter: a.cfg.TunnelDeadAfter, OnDead: func(time.Duration) { a.m.silent.Inc() }},
	})
}

func (a *Agent) logWelcome(log *slog.Logger, c candidate, s *tunnel.AgentSession) {
	refused := 0
	for i, r := range s.Welcome.Endpoints {
		if r.Code == tunnel.CodeOK {
			continue
		}
		refused++
		if refused <= 10 {
			log.Warn("endpoint refused by ps", "ps_id", s.Welcome.PSID, "target", a.endpoints[i].String(), "code", r.Code.String(), "reason", r.Reason)
		}
	}
	log.Info("tunnel up", "ps_id", s.Welcome.PSID, "server", c.addr, "ps_addr", s.Welcome.PSAddr.String(),
		"endpoints", len(s.Welcome.Endpoints)-refused, "refused", refused)
}

// serve accepts the streams of the slot's tunnel until it ends. When the
// PS refused endpoints for a reason that may pass (another agent's live
// route, no free port), it handshakes again after RetryRefused with a newer
// epoch; on the same PS the new session takes over the old one's ports, so
// the endpoints already served do not move.
//
// When ctx ends the session drains (drain, agent/report.go). When the
// tunnel ends while the agent runs, and its PS did not close it on
// purpose, the loss is reported through the other tunnels before serve
// returns, so the slot re-dials only after the report was acked.
func (a *Agent) serve(ctx context.Context, slot int, s *tunnel.AgentSession, log *slog.Logger) {
	tr := track(s)
	tr.pool = a.startPool(tr, log.With("ps_id", s.Welcome.PSID))
	lost := false
	defer func() {
		tr.pool.close()
		_ = s.Close()
		a.mu.Lock()
		delete(a.held, slot)
		delete(a.sessions, slot)
		a.mu.Unlock()
		a.m.tunnels.Dec()
		if lost {
			a.reportLost(s, log)
		}
	}()
	go a.acceptStreams(tr, log.With("ps_id", s.Welcome.PSID))
	for {
		var retry <-chan time.Time
		var t *time.Timer
		if retryable(s.Welcome) {
			t = time.NewTimer(jitter.Spread(a.cfg.RetryRefused, 0.5))
			retry = t.C
		}
		select {
		case <-ctx.Done():
		case <-s.Done():
		case <-retry:
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			a.drain(tr, time.Now().Add(a.cfg.DrainTimeout), log.With("ps_id", s.Welcome.PSID))
			return
		}
		select {
		case <-s.Done():
			lost = a.tunnelLost(s, log)
			return
		default:
		}
		ns, err := a.connect(ctx, slot, log)
		if err != nil {
			log.Warn("retry of refused endpoints failed; keeping the current tunnel", "err", err)
			continue
		}
		old := s
		s = ns
		tr = track(s)
		tr.pool = a.startPool(tr, log.With("ps_id", s.Welcome.PSID))
		go a.acceptStreams(tr, log.With("ps_id", s.Welcome.PSID))
		if old.Welcome.PSID != ns.Welcome.PSID {
			log.Info("tunnel moved to another ps while retrying refused endpoints", "from", old.Welcome.PSID, "to", ns.Welcome.PSID)
		}
		_ = old.Close() // its pool closes with it
		a.m.tunnels.Dec()
	}
}

// acceptStreams serves the streams of t's session until it ends. It does
// not stop when the agent's context ends: a drain keeps serving until its
// settle is over, then refuses new streams (busy) until the tunnel closes.
func (a *Agent) acceptStreams(t *tracked, log *slog.Logger) {
	for {
		in, err := t.sess.Accept(context.Background())
		if err != nil {
			return
		}
		if t.refusing.Load() {
			go func() { _ = in.Reject(tunnel.StreamBusy, errDraining.Error()) }()
			continue
		}
		t.lastStream.Store(time.Now().UnixNano())
		t.inflight.Add(1)
		go func() {
			defer t.inflight.Add(-1)
			a.handleStream(in, log)
		}()
	}
}

// retryable reports whether w refused an endpoint for a reason that may
// pass on its own.
func retryable(w *tunnel.Welcome) bool {
	for _, r := range w.Endpoints {
		switch r.Code {
		case tunnel.CodeConflict, tunnel.CodeNoPorts, tunnel.CodeUnavailable, tunnel.CodeInternal:
			return true
		}
	}
	return false
}

// handleStream answers one stream: it checks the target is exposed, dials
// it, reports the outcome, then joins the two.
func (a *Agent) handleStream(in *tunnel.Incoming, log *slog.Logger) {
	h, err := in.ReadHeader(headerTimeout)
	if errors.Is(err, tunnel.ErrControlStream) {
		return // the tunnel's control channel, not a client connection
	}
	conn := a.openTarget(h, err, in, log)
	if conn == nil {
		return
	}
	st, err := in.Accept()
	if err != nil {
		_ = conn.Close()
		return
	}
	a.m.streamsOpen.Inc()
	defer a.m.streamsOpen.Dec()
	_, _, _ = relay.Join(st, conn, a.m.bytesIn, a.m.bytesOut)
}

// serveData answers a data connection the PS paired with a client (h, or
// the error reading it) exactly as handleStream answers a stream, then
// moves the bytes with relay.Splice: with a kernel splice when the data
// connection is plain TCP.
func (a *Agent) serveData(t *tracked, dc *tunnel.DataConn, h tunnel.StreamHeader, headerErr error, log *slog.Logger) {
	if t.refusing.Load() {
		_ = dc.Reject(tunnel.StreamBusy, errDraining.Error())
		return
	}
	conn := a.openTarget(h, headerErr, dc, log)
	if conn == nil {
		return
	}
	c, err := dc.Accept()
	if err != nil {
		_ = conn.Close()
		return
	}
	a.m.streamsOpen.Inc()
	defer a.m.streamsOpen.Dec()
	_, _, _ = relay.Splice(c, conn, relay.Options{AToB: a.m.bytesIn, BToA: a.m.bytesOut})
}

// rejecter answers a client connection the agent will not serve: a tunnel
// stream or a data connection.
type rejecter interface {
	Reject(code tunnel.StreamCode, msg string) error
}

// openTarget counts a client connection whose header was read (h, or
// headerErr), checks its target is exposed and dials it. It returns the
// local connection, or nil after refusing the client through r with the
// reason.
func (a *Agent) openTarget(h tunnel.StreamHeader, headerErr error, r rejecter, log *slog.Logger) *net.TCPConn {
	a.m.streams.Inc()
	if err := headerErr; err != nil {
		code := tunnel.StreamBadHeader
		if errors.Is(err, tunnel.ErrVersion) {
			code = tunnel.StreamVersionErr
		}
		a.m.streamErrors.WithLabelValues(code.String()).Inc()
		log.Warn("bad stream header", "err", err)
		_ = r.Reject(code, err.Error())
		return nil
	}
	dialAddr, ok := a.dial[h.Target]
	if !ok {
		// docs/DESIGN.md invariant 1: never deliver a connection meant for
		// another target.
		a.m.streamErrors.WithLabelValues(tunnel.StreamNotExposed.String()).Inc()
		log.Warn("refused stream for a target this agent does not expose", "target", h.Target.String(), "client", h.Source.String())
		_ = r.Reject(tunnel.StreamNotExposed, fmt.Sprintf("%s is not exposed by agent %s", h.Target, a.cfg.ID))
		return nil
	}
	// No TCP keepalive on the local leg: the target is on this host (or
	// next to it), and the three setsockopt calls are a measurable share
	// of a short connection's cost.
	d := net.Dialer{Timeout: a.cfg.DialTimeout, KeepAlive: -1}
	dialStart := time.Now()
	conn, err := d.Dial("tcp", dialAddr)
	a.m.dialSeconds.Observe(time.Since(dialStart).Seconds())
	if err != nil {
		code := dialCode(err)
		a.m.streamErrors.WithLabelValues(code.String()).Inc()
		a.dialFails.failed(log, h.Target, dialAddr, code.String(), err)
		_ = r.Reject(code, fmt.Sprintf("dial %s: %v", dialAddr, err))
		return nil
	}
	return conn.(*net.TCPConn)
}

func dialCode(err error) tunnel.StreamCode {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return tunnel.StreamDialRefused
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return tunnel.StreamDialTimeout
	default:
		return tunnel.StreamDialFailed
	}
}

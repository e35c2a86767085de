package ps

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-net/tether/internal/pki"
	"github.com/tether-net/tether/tunnel"
)

// The pooled data path (tunnel/SPEC.md, "Data connections"): besides its
// tunnel, an agent keeps a few dedicated TCP (TLS) connections to this PS,
// each opened with its session's pool key. A client connection is paired
// with one idle data connection (data.go, carryPooled) and its bytes move
// with a kernel splice instead of through yamux frames. The pool listener
// accepts them; poolSet holds the idle ones per session.

// The data paths --data-path names.
const (
	DataPathAuto = "auto" // an idle data connection when there is one (plain TCP tunnels only), else the tunnel
	DataPathPool = "pool" // wait up to --pool-wait for a data connection, then the tunnel
	DataPathMux  = "mux"  // the tunnel only: no pool is offered
)

// Limits of the pool listener: openings (TLS and the key) in progress at
// once, from one source and in all. An opening lasts at most
// --preamble-timeout, so these bound what a flood of silent connections
// holds; an agent refills its pool a few connections at a time.
const (
	poolOpeningsPerSource = 64
	poolOpenings          = 1024
)

// Results of a data connection's opening, the result label of
// tether_ps_pool_conns_total.
const (
	poolAccepted = "accepted"
	poolRefused  = "refused"
)

// poolSet is the session registry of the pooled data path: pool key ->
// the session's pool.
type poolSet struct {
	mu    sync.Mutex
	byKey map[tunnel.PoolKey]*sessionPool
	bySes map[*psSession]*sessionPool
	// idle counts idle data connections of all sessions (the
	// tether_ps_pool_idle gauge reads it).
	idle atomic.Int64
	// openings counts openings in progress; sources per source address.
	openings atomic.Int64
	sources  *sourceLimit
}

func newPoolSet() *poolSet {
	return &poolSet{
		byKey:   map[tunnel.PoolKey]*sessionPool{},
		bySes:   map[*psSession]*sessionPool{},
		sources: newSourceLimit(poolOpeningsPerSource),
	}
}

// sessionPool is one session's idle data connections.
type sessionPool struct {
	key  tunnel.PoolKey
	sess *psSession
	size int
	set  *poolSet

	mu     sync.Mutex
	idle   []*dataConn
	closed bool
	// reserved counts connections being answered ok, not yet idle: they
	// count against size, so a full pool refuses before it answers.
	reserved int
	// added is closed and replaced whenever a connection is added, to wake
	// client connections waiting for one (--data-path pool).
	added chan struct{}
}

// dataConn is an idle data connection: conn is what bytes move over (the
// *tls.Conn under TLS), raw the socket. watch reads it while it is idle, so
// that one the agent closes leaves the pool at once.
type dataConn struct {
	conn    net.Conn
	raw     *net.TCPConn
	watched chan struct{} // closed when the watcher returned
	dead    atomic.Bool   // the watcher saw the connection end
}

// join returns s's pool, creating it with a fresh key; a session has one
// pool and one key for its life.
func (ps *poolSet) join(s *psSession, size int) (*sessionPool, error) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if sp := ps.bySes[s]; sp != nil {
		return sp, nil
	}
	key, err := tunnel.NewPoolKey()
	if err != nil {
		return nil, err
	}
	sp := &sessionPool{key: key, sess: s, size: size, set: ps, added: make(chan struct{})}
	ps.byKey[key] = sp
	ps.bySes[s] = sp
	return sp, nil
}

// lookup returns the pool of key, nil when unknown.
func (ps *poolSet) lookup(key tunnel.PoolKey) *sessionPool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.byKey[key]
}

// of returns s's pool, nil when it has none.
func (ps *poolSet) of(s *psSession) *sessionPool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.bySes[s]
}

// drop forgets s's pool and closes its idle connections: the session
// ended, was superseded, or withdrew its routes. The agent's side of each
// connection then ends, and it stops refilling (its key is refused).
func (ps *poolSet) drop(s *psSession) {
	ps.mu.Lock()
	sp := ps.bySes[s]
	if sp != nil {
		delete(ps.bySes, s)
		delete(ps.byKey, sp.key)
	}
	ps.mu.Unlock()
	if sp != nil {
		sp.close()
	}
}

// dropAll drops every pool (the PS stops accepting).
func (ps *poolSet) dropAll() {
	ps.mu.Lock()
	all := make([]*sessionPool, 0, len(ps.bySes))
	for _, sp := range ps.bySes {
		all = append(all, sp)
	}
	clear(ps.bySes)
	clear(ps.byKey)
	ps.mu.Unlock()
	for _, sp := range all {
		sp.close()
	}
}

func (sp *sessionPool) close() {
	sp.mu.Lock()
	idle := sp.idle
	sp.idle = nil
	wasClosed := sp.closed
	sp.closed = true
	if !wasClosed {
		close(sp.added)
	}
	sp.mu.Unlock()
	sp.set.idle.Add(-int64(len(idle)))
	for _, dc := range idle {
		_ = dc.raw.Close()
	}
}

// reserve takes a place in the pool for a connection about to be answered;
// false when the pool is full or closed.
func (sp *sessionPool) reserve() bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.closed || len(sp.idle)+sp.reserved >= sp.size {
		return false
	}
	sp.reserved++
	return true
}

// unreserve gives back a place reserve took, for a connection that failed.
func (sp *sessionPool) unreserve() {
	sp.mu.Lock()
	sp.reserved--
	sp.mu.Unlock()
}

// add puts dc in its reserved place and starts its watcher; false when the
// pool closed meanwhile.
func (sp *sessionPool) add(dc *dataConn) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.reserved--
	if sp.closed {
		return false
	}
	sp.idle = append(sp.idle, dc)
	sp.set.idle.Add(1)
	close(sp.added)
	sp.added = make(chan struct{})
	go sp.watch(dc)
	return true
}

// watch reads dc while it is idle. The agent sends nothing on an idle data
// connection, so the read ends only when the connection does (the agent
// closed it, a reset, a keepalive timeout), or when take stops it with a
// past deadline; a connection that ended leaves the pool at once.
func (sp *sessionPool) watch(dc *dataConn) {
	defer close(dc.watched)
	var b [1]byte
	_, err := dc.conn.Read(b[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return // take stopped the watch: dc is being paired
	}
	dc.dead.Store(true)
	if sp.remove(dc) {
		_ = dc.raw.Close()
	}
}

// remove takes dc out of the pool; false when it was not there (taken, or
// the pool closed).
func (sp *sessionPool) remove(dc *dataConn) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	for i, x := range sp.idle {
		if x == dc {
			sp.idle = append(sp.idle[:i], sp.idle[i+1:]...)
			sp.set.idle.Add(-1)
			return true
		}
	}
	return false
}

// take returns an idle connection, waiting up to wait for one to be added
// when none is idle; nil when none came or the pool closed. The newest is
// taken first: it is the least likely to have gone stale. Its watcher is
// stopped before it is returned.
func (sp *sessionPool) take(wait time.Duration) *dataConn {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		sp.mu.Lock()
		if sp.closed {
			sp.mu.Unlock()
			return nil
		}
		if n := len(sp.idle); n > 0 {
			dc := sp.idle[n-1]
			sp.idle = sp.idle[:n-1]
			sp.set.idle.Add(-1)
			sp.mu.Unlock()
			// Stop the watcher: a past deadline ends its read, and the
			// deadline is cleared again once it returned (OpenData sets
			// its own).
			_ = dc.conn.SetReadDeadline(time.Unix(1, 0))
			<-dc.watched
			if dc.dead.Load() {
				_ = dc.raw.Close()
				continue
			}
			_ = dc.conn.SetReadDeadline(time.Time{})
			return dc
		}
		added := sp.added
		sp.mu.Unlock()
		if wait <= 0 {
			return nil
		}
		if timer == nil {
			timer = time.NewTimer(wait)
		}
		select {
		case <-added:
		case <-timer.C:
			return nil
		}
	}
}

// listenPool opens the pool listener, nil when --pool-listen is empty or
// the data path is mux (no pool is offered).
func (p *PS) listenPool() (net.Listener, error) {
	if p.cfg.PoolListen == "" || p.cfg.DataPath == DataPathMux {
		return nil, nil
	}
	ln, err := net.Listen("tcp", p.cfg.PoolListen)
	if err != nil {
		return nil, fmt.Errorf("listen for data connections on %s (--pool-listen): %w", p.cfg.PoolListen, err)
	}
	return ln, nil
}

// acceptData accepts data connections until ln is closed.
func (p *PS) acceptData(ln net.Listener) error {
	acceptEach(ln, p.log, "accept data connection", func(c net.Conn) {
		source := addrPortOf(c.RemoteAddr()).Addr()
		if !p.pools.sources.tryAcquire(source) {
			p.m.poolConns.WithLabelValues(poolRefused).Inc()
			_ = c.Close()
			return
		}
		if p.pools.openings.Add(1) > poolOpenings {
			p.pools.openings.Add(-1)
			p.pools.sources.release(source)
			p.m.poolConns.WithLabelValues(poolRefused).Inc()
			_ = c.Close()
			return
		}
		go func() {
			defer p.pools.sources.release(source)
			defer p.pools.openings.Add(-1)
			p.openData(c.(*net.TCPConn))
		}()
	})
	return nil
}

// openData runs a data connection's opening: TLS, magic, version and key
// within --preamble-timeout, then the checks, then it joins its session's
// pool or is refused with a status and closed.
func (p *PS) openData(raw *net.TCPConn) {
	log := p.log.With("remote", raw.RemoteAddr().String())
	_ = raw.SetDeadline(time.Now().Add(p.cfg.PreambleTimeout))
	var conn net.Conn = raw
	refuse := func(code tunnel.StreamCode, why string) {
		p.m.poolConns.WithLabelValues(poolRefused).Inc()
		log.Debug("data connection refused", "code", code.String(), "reason", why)
		if code != tunnel.StreamOK && tunnel.AnswerData(conn, tunnel.StreamStatus{Code: code, Message: why}) == nil {
			// Half-close and drain briefly, so the agent reads the
			// refusal rather than a reset caused by bytes it sent that
			// nobody read (a newer opening's key).
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			_ = raw.SetReadDeadline(time.Now().Add(time.Second))
			_, _ = io.CopyN(io.Discard, conn, 64<<10)
		}
		_ = raw.Close()
	}
	if p.tls != nil {
		tc := tls.Server(raw, p.tls)
		if err := tc.Handshake(); err != nil {
			refuse(tunnel.StreamOK, "tls: "+err.Error()) // nothing to answer on
			return
		}
		conn = tc
	}
	key, err := tunnel.ReadDataOpening(conn)
	switch {
	case errors.Is(err, tunnel.ErrVersion):
		refuse(tunnel.StreamVersionErr, err.Error())
		return
	case err != nil:
		// Garbage, a timeout or a connection that went away: nobody to
		// answer who would understand.
		refuse(tunnel.StreamOK, err.Error())
		return
	}
	sp := p.pools.lookup(key)
	if sp == nil {
		refuse(tunnel.StreamPoolRefused, "unknown pool key: the session is gone")
		return
	}
	if why := p.dataIdentity(conn, sp.sess); why != "" {
		refuse(tunnel.StreamPoolRefused, why)
		return
	}
	if !sp.reserve() {
		refuse(tunnel.StreamPoolRefused, fmt.Sprintf("the session's pool is full (%d idle) or closed", sp.size))
		return
	}
	dc := &dataConn{conn: conn, raw: raw, watched: make(chan struct{})}
	// Answer before it is idle in the pool: once in, a client connection
	// may write its stream header at once, and the agent must have read
	// the ok first.
	if err := tunnel.AnswerData(conn, tunnel.StreamStatus{Code: tunnel.StreamOK}); err != nil {
		sp.unreserve()
		refuse(tunnel.StreamOK, err.Error())
		return
	}
	_ = raw.SetDeadline(time.Time{})
	_ = raw.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: tunnel.DataKeepAlive, Interval: tunnel.DataKeepAlive, Count: 3})
	if !sp.add(dc) {
		// The session ended meanwhile: closing is the agent's answer.
		refuse(tunnel.StreamOK, "the session's pool closed")
		return
	}
	p.m.poolConns.WithLabelValues(poolAccepted).Inc()
}

// dataIdentity checks that a data connection comes from the session's
// agent: when it carries a verified client certificate, the certificate
// must name the session's agent id; when the PS requires client
// certificates, it must carry one. It returns why not, or "".
func (p *PS) dataIdentity(conn net.Conn, s *psSession) string {
	tc, ok := conn.(*tls.Conn)
	if !ok {
		if p.auth.certs {
			return "no client certificate"
		}
		return ""
	}
	id, _, err := pki.PeerAgent(tc.ConnectionState())
	switch {
	case err != nil && p.auth.certs:
		return "client certificate: " + err.Error()
	case err != nil:
		return ""
	case id != s.agentID:
		return fmt.Sprintf("the client certificate is for agent %q, the pool key for %q", id, s.agentID)
	}
	return ""
}

// JoinPool grants the session a pool of data connections: its key, where
// to dial, and how many idle ones this PS keeps.
func (h *controlHandler) JoinPool(ctx context.Context) (*tunnel.PoolGrant, tunnel.Ack) {
	p, s := h.p, h.s
	switch {
	case p.cfg.DataPath == DataPathMux:
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "data path is mux"}
	case p.cfg.DataPath == DataPathAuto && p.tls != nil:
		// Measured (test/bench/paths): under TLS a pooled connection costs
		// a TLS handshake per client connection and moves bytes with a
		// user-space copy, as the tunnel does (Go has no kernel TLS): 0.31x
		// the tunnel's connect+request+close and ~1.1x its bulk. auto
		// pools where the splice pays, plain TCP; pool forces it.
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "data path auto uses the tunnel under TLS (--data-path pool to pool anyway)"}
	case p.poolAddr() == (netip.AddrPort{}):
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "no pool listener (--pool-listen is empty)"}
	case p.draining.Load():
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "ps is draining"}
	case !h.current():
		return nil, tunnel.Ack{Code: tunnel.CodeStaleEpoch, Reason: "this session was superseded by a newer one of the agent"}
	}
	dial := p.poolDialAddr(s)
	if !dial.IsValid() {
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "no address to offer for the pool listener"}
	}
	sp, err := p.pools.join(s, p.cfg.PoolSize)
	if err != nil {
		return nil, tunnel.Ack{Code: tunnel.CodeInternal, Reason: err.Error()}
	}
	select {
	case <-s.tun.Done():
		// The session ended while joining: endSession may have dropped
		// the pools already, so drop again.
		p.pools.drop(s)
		return nil, tunnel.Ack{Code: tunnel.CodeUnavailable, Reason: "session ended"}
	default:
	}
	s.log.Debug("pool granted", "dial", dial.String(), "size", sp.size, "key", sp.key.String())
	return &tunnel.PoolGrant{Key: sp.key, Addr: dial, Size: uint16(sp.size)}, tunnel.Ack{}
}

// poolAddr is the pool listener's bound address, zero when there is none.
func (p *PS) poolAddr() netip.AddrPort {
	p.lnMu.Lock()
	defer p.lnMu.Unlock()
	if p.poolLn == nil {
		return netip.AddrPort{}
	}
	return addrPortOf(p.poolLn.Addr())
}

// poolDialAddr is where s's agent dials data connections: --pool-advertise
// when set; else the pool listener's own address when it is bound to one;
// else the address the agent reached this PS's tunnel listener at, with
// the pool listener's port.
func (p *PS) poolDialAddr(s *psSession) netip.AddrPort {
	if p.cfg.PoolAdvertise != "" {
		ap, _ := netip.ParseAddrPort(p.cfg.PoolAdvertise)
		return ap
	}
	bound := p.poolAddr()
	if !bound.Addr().IsUnspecified() {
		return bound
	}
	if !s.tunnelLocal.IsValid() {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(s.tunnelLocal.Addr(), bound.Port())
}

// validDataPath checks the pooled data path's flags.
func (c *Config) validDataPath() []error {
	var errs []error
	switch c.DataPath {
	case DataPathAuto, DataPathPool, DataPathMux:
	default:
		errs = append(errs, fmt.Errorf("--data-path %q: want %s, %s or %s", c.DataPath, DataPathAuto, DataPathPool, DataPathMux))
	}
	if c.PoolListen != "" {
		if _, _, err := net.SplitHostPort(c.PoolListen); err != nil {
			errs = append(errs, fmt.Errorf("--pool-listen %q: %w", c.PoolListen, err))
		}
	}
	if c.PoolWait < 0 || c.PoolWait > OpenTimeout {
		errs = append(errs, fmt.Errorf("--pool-wait %v: want 0 to %v", c.PoolWait, OpenTimeout))
	}
	if c.PoolSize < 1 || c.PoolSize > 1024 {
		errs = append(errs, fmt.Errorf("--pool-size %d: want 1 to 1024", c.PoolSize))
	}
	if c.PoolAdvertise != "" {
		ap, err := netip.ParseAddrPort(c.PoolAdvertise)
		if err != nil || ap.Addr().IsUnspecified() || ap.Port() == 0 {
			errs = append(errs, fmt.Errorf("--pool-advertise %q: want the IP:port agents reach the pool listener at", c.PoolAdvertise))
		}
	}
	return errs
}

// logPool logs the pool listener at start.
func (p *PS) logPool(ln net.Listener) {
	if ln == nil {
		p.log.Info("no pooled data path", "data_path", p.cfg.DataPath, "pool_listen", p.cfg.PoolListen)
		return
	}
	p.log.Info("pool listener open", "pool_listen", ln.Addr().String(), "data_path", p.cfg.DataPath,
		"pool_size", p.cfg.PoolSize, "pool_wait", p.cfg.PoolWait, slog.String("pool_advertise", p.cfg.PoolAdvertise))
}

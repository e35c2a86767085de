package ps

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// connHandler is told "a connection arrived for the PS address and port
// at", and how loaded the data plane is with it. It owns c.
type connHandler func(at netip.AddrPort, c net.Conn, load connLoad)

// connLoad is how many client connections the data plane was carrying
// when it handed one out, that one included: on its (address, port) and
// on all of them. The plane counts (it sees each connection's whole life, from
// accept to the handler's return); the PS decides what is too many.
type connLoad struct {
	pair, total int64
}

// dataPlane is the PS's accept path for client connections. The PS asks
// it to start and stop accepting on (address, port) pairs of its advertise
// addresses; it calls the connHandler for each connection, with the load
// counted until the handler returns. This is the whole interface: the
// per-port listeners below and one socket steered by an sk_lookup program
// (skplane_linux.go) are interchangeable behind it.
type dataPlane interface {
	// Open starts accepting on at; an error means the pair cannot be used
	// (the OS refused the bind, the steering map is full).
	Open(at netip.AddrPort) error
	// Release stops accepting on at: a new connection to it is refused.
	Release(at netip.AddrPort)
	// Close stops accepting on every pair.
	Close() error
	// Name is the plane's name as --data-plane spells it.
	Name() string
}

// listenerPlane is a dataPlane with one listening socket per pair: the
// fallback where sk_lookup cannot load. Each idle endpoint costs a file
// descriptor and an accept goroutine.
type listenerPlane struct {
	handler connHandler
	log     *slog.Logger
	saveSYN bool

	active atomic.Int64 // connections handed out and not yet returned

	mu     sync.Mutex
	lns    map[netip.AddrPort]*portListener
	closed bool
	wg     sync.WaitGroup
}

// portListener is one port's socket and the connections it handed out
// that are still being handled. The count belongs to the listener, not to
// the port number: connections accepted before a release do not count
// against whoever the port serves next.
type portListener struct {
	ln     net.Listener
	active atomic.Int64
}

// newListenerPlane builds the per-port data plane; with saveSYN every
// listener keeps each connection's SYN for the intent check (intent.go).
func newListenerPlane(h connHandler, log *slog.Logger, saveSYN bool) *listenerPlane {
	return &listenerPlane{handler: h, log: log, saveSYN: saveSYN, lns: map[netip.AddrPort]*portListener{}}
}

func (p *listenerPlane) Name() string { return DataPlaneListeners }

var errPlaneClosed = errors.New("data plane closed")

func (p *listenerPlane) Open(at netip.AddrPort) error {
	var lc net.ListenConfig
	if p.saveSYN {
		lc.Control = SaveSYN
	}
	ln, err := lc.Listen(context.Background(), "tcp", at.String())
	if err != nil {
		return fmt.Errorf("listen on %s: %w", at, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		_ = ln.Close()
		return errPlaneClosed
	}
	pl := &portListener{ln: ln}
	p.lns[at] = pl
	p.wg.Add(1)
	p.mu.Unlock()
	go p.serve(at, pl)
	return nil
}

func (p *listenerPlane) serve(at netip.AddrPort, pl *portListener) {
	defer p.wg.Done()
	acceptEach(pl.ln, p.log, "accept", func(c net.Conn) {
		load := connLoad{pair: pl.active.Add(1), total: p.active.Add(1)}
		go func() {
			defer func() {
				pl.active.Add(-1)
				p.active.Add(-1)
			}()
			p.handler(at, c, load)
		}()
	}, "at", at.String())
}

func (p *listenerPlane) Release(at netip.AddrPort) {
	p.mu.Lock()
	pl := p.lns[at]
	delete(p.lns, at)
	p.mu.Unlock()
	if pl != nil {
		_ = pl.ln.Close()
	}
}

func (p *listenerPlane) Close() error {
	p.mu.Lock()
	p.closed = true
	lns := p.lns
	p.lns = map[netip.AddrPort]*portListener{}
	p.mu.Unlock()
	for _, pl := range lns {
		_ = pl.ln.Close()
	}
	p.wg.Wait()
	return nil
}

// newDataPlane builds the plane --data-plane asks for, steering up to
// capacity pairs. auto tries sk_lookup (one socket, no file descriptor or
// goroutine per endpoint) and falls back to the per-port listeners where
// it cannot load (kernel before 5.9, no CAP_BPF and CAP_NET_ADMIN), saying
// why; sk_lookup asked for by name fails instead of falling back.
func (p *PS) newDataPlane(capacity int) (dataPlane, error) {
	saveSYN := p.cfg.Intent != IntentOff
	if p.cfg.DataPlane == DataPlaneListeners {
		return newListenerPlane(p.handleConn, p.log, saveSYN), nil
	}
	sk, err := newSKLookupPlane(p.advertise, capacity, p.handleConn, p.log, saveSYN)
	switch {
	case err == nil:
		p.log.Info("data plane: sk_lookup steers every assigned address:port to one socket", "capacity", capacity, "asked", p.cfg.DataPlane)
		return sk, nil
	case p.cfg.DataPlane == DataPlaneSKLookup:
		return nil, fmt.Errorf("--data-plane %s: %w", DataPlaneSKLookup, err)
	}
	p.log.Warn("data plane: sk_lookup unavailable, falling back to a listening socket per port (each endpoint costs a file descriptor)", "reason", err.Error())
	return newListenerPlane(p.handleConn, p.log, saveSYN), nil
}

// acceptEach hands every connection ln accepts to each, until ln is
// closed. A failed accept (out of file descriptors and the like) is logged
// with what (plus attrs) and retried after a back-off that doubles up to a
// second, as net/http does, instead of spinning.
func acceptEach(ln net.Listener, log *slog.Logger, what string, each func(net.Conn), attrs ...any) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			log.Warn(what+" failed", append(attrs, "err", err, "retry_in", delay)...)
			time.Sleep(delay)
			continue
		}
		delay = 0
		each(c)
	}
}

package ps

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"
)

// connHandler is told "a connection arrived for local port P". It owns c.
type connHandler func(port uint16, c net.Conn)

// dataPlane is the PS's accept path for client connections. The PS asks
// it to start and stop accepting on ports; it calls the connHandler for
// each connection. This is the whole interface, so that one socket steered
// by an sk_lookup program can replace the per-port listeners below without
// the rest of the PS noticing.
type dataPlane interface {
	// Open starts accepting on port; an error means the port cannot be
	// used (the OS refused the bind).
	Open(port uint16) error
	// Release stops accepting on port.
	Release(port uint16)
	// Close stops accepting on every port.
	Close() error
}

// listenerPlane is a dataPlane with one listening socket per port.
type listenerPlane struct {
	addr    netip.Addr
	handler connHandler
	log     *slog.Logger

	mu     sync.Mutex
	lns    map[uint16]net.Listener
	closed bool
	wg     sync.WaitGroup
}

func newListenerPlane(addr netip.Addr, h connHandler, log *slog.Logger) *listenerPlane {
	return &listenerPlane{addr: addr, handler: h, log: log, lns: map[uint16]net.Listener{}}
}

var errPlaneClosed = errors.New("data plane closed")

func (p *listenerPlane) Open(port uint16) error {
	ln, err := net.Listen("tcp", net.JoinHostPort(p.addr.String(), strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("listen on port %d: %w", port, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		_ = ln.Close()
		return errPlaneClosed
	}
	p.lns[port] = ln
	p.wg.Add(1)
	p.mu.Unlock()
	go p.serve(port, ln)
	return nil
}

func (p *listenerPlane) serve(port uint16, ln net.Listener) {
	defer p.wg.Done()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off briefly
			// instead of spinning, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed", "port", port, "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		go p.handler(port, c)
	}
}

func (p *listenerPlane) Release(port uint16) {
	p.mu.Lock()
	ln := p.lns[port]
	delete(p.lns, port)
	p.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
}

func (p *listenerPlane) Close() error {
	p.mu.Lock()
	p.closed = true
	lns := p.lns
	p.lns = map[uint16]net.Listener{}
	p.mu.Unlock()
	for _, ln := range lns {
		_ = ln.Close()
	}
	p.wg.Wait()
	return nil
}

package ps

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// connHandler is told "a connection arrived for local port P", and how
// loaded the data plane is with it. It owns c.
type connHandler func(port uint16, c net.Conn, load connLoad)

// connLoad is how many client connections the data plane was carrying
// when it handed one out, that one included: on its port and on all
// ports. The plane counts (it sees each connection's whole life, from
// accept to the handler's return); the PS decides what is too many.
type connLoad struct {
	port, total int64
}

// dataPlane is the PS's accept path for client connections. The PS asks
// it to start and stop accepting on ports; it calls the connHandler for
// each connection, with the load counted until the handler returns. This
// is the whole interface, so that one socket steered by an sk_lookup
// program can replace the per-port listeners below without the rest of the
// PS noticing.
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
	saveSYN bool

	active atomic.Int64 // connections handed out and not yet returned

	mu     sync.Mutex
	lns    map[uint16]*portListener
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
func newListenerPlane(addr netip.Addr, h connHandler, log *slog.Logger, saveSYN bool) *listenerPlane {
	return &listenerPlane{addr: addr, handler: h, log: log, saveSYN: saveSYN, lns: map[uint16]*portListener{}}
}

var errPlaneClosed = errors.New("data plane closed")

func (p *listenerPlane) Open(port uint16) error {
	var lc net.ListenConfig
	if p.saveSYN {
		lc.Control = SaveSYN
	}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(p.addr.String(), strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("listen on port %d: %w", port, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		_ = ln.Close()
		return errPlaneClosed
	}
	pl := &portListener{ln: ln}
	p.lns[port] = pl
	p.wg.Add(1)
	p.mu.Unlock()
	go p.serve(port, pl)
	return nil
}

func (p *listenerPlane) serve(port uint16, pl *portListener) {
	defer p.wg.Done()
	var delay time.Duration
	for {
		c, err := pl.ln.Accept()
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
		load := connLoad{port: pl.active.Add(1), total: p.active.Add(1)}
		go func() {
			defer func() {
				pl.active.Add(-1)
				p.active.Add(-1)
			}()
			p.handler(port, c, load)
		}()
	}
}

func (p *listenerPlane) Release(port uint16) {
	p.mu.Lock()
	pl := p.lns[port]
	delete(p.lns, port)
	p.mu.Unlock()
	if pl != nil {
		_ = pl.ln.Close()
	}
}

func (p *listenerPlane) Close() error {
	p.mu.Lock()
	p.closed = true
	lns := p.lns
	p.lns = map[uint16]*portListener{}
	p.mu.Unlock()
	for _, pl := range lns {
		_ = pl.ln.Close()
	}
	p.wg.Wait()
	return nil
}

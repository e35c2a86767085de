// The sk_lookup data plane: one listening socket per address family, and a
// BPF program (bpf/sklookup.c) attached to the PS's network namespace that
// hands every TCP connection to an open (address, port) pair to it. Opening
// a pair is one map update; an idle pair costs one small Go map entry and
// one kernel hash entry, and no socket, file descriptor or goroutine.
//
// Nothing is pinned: the program, its maps and the netns link are held by
// file descriptors of this process only, so they die with it. A PS that
// crashes or restarts leaves no steering behind (and the SOCKMAP entry dies
// with its listening socket anyway): its pairs are refused until a new PS
// opens them again.

package ps

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/relay"
)

// skLookupPlane is the dataPlane of one socket per address family, with
// the pairs steered to it by an sk_lookup program.
type skLookupPlane struct {
	handler  connHandler
	log      *slog.Logger
	capacity int

	objs bpf.SklookupObjects
	link link.Link
	// listeners by steering slot (bpf.SklookupSteerSocketSTEER_SOCKET_IPV4,
	// _IPV6); nil for a family none of the addresses has.
	listeners [2]net.Listener

	active    atomic.Int64  // connections handed out and not yet returned
	unclaimed atomic.Uint64 // connections reset: their pair was released before accept

	// mu guards pairs against the accept loops' lookups; Open and Release
	// hold it across their map update, so a connection is delivered exactly
	// when its pair is open in both the kernel map and here.
	mu     sync.RWMutex
	pairs  map[netip.AddrPort]*steeredPair
	closed bool
	wg     sync.WaitGroup // accept loops

	// claimHook, when set (tests only), runs between accept and the
	// lookup of the connection's pair.
	claimHook atomic.Pointer[func(at netip.AddrPort)]
}

// steeredPair is what an open pair costs in Go: its count of connections
// being handled (8 bytes; with the pairs map's 32-byte key and pointer,
// about 80 bytes of heap per pair, measured at 50,000 pairs). The
// count belongs to one Open: connections accepted before a Release do not
// count against whoever the pair serves next.
type steeredPair struct {
	active atomic.Int64
}

// errNeedsCaps is the hint for EPERM: cilium/ebpf's own hint (MEMLOCK)
// does not apply on current kernels; the capabilities do (CAP_BPF alone
// cannot create the SOCKMAP).
const errNeedsCaps = "the sk_lookup data plane needs CAP_BPF and CAP_NET_ADMIN"

// newSKLookupPlane listens on the first of addrs of each family (port 0),
// loads the steering program with room for capacity pairs, and attaches it
// to the network namespace of the calling thread. h is called for each
// connection to an open pair; with saveSYN the listeners keep each SYN for
// the intent check, as the per-port listeners do.
func newSKLookupPlane(addrs []netip.Addr, capacity int, h connHandler, log *slog.Logger, saveSYN bool) (_ *skLookupPlane, err error) {
	if capacity < 1 {
		return nil, fmt.Errorf("sk_lookup data plane: capacity %d: want at least one pair", capacity)
	}
	// The sockets and the link must be in the namespace this thread is
	// in: a caller that entered another namespace on it gets that one.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	p := &skLookupPlane{handler: h, log: log, capacity: capacity, pairs: map[netip.AddrPort]*steeredPair{}}
	defer func() {
		if err != nil {
			p.teardown()
		}
	}()

	lc := net.ListenConfig{}
	// A Go listener is MPTCP by default (Go >= 1.24), and a SOCKMAP
	// refuses an MPTCP socket ("operation not supported").
	lc.SetMultipathTCP(false)
	if saveSYN {
		lc.Control = SaveSYN
	}
	for _, a := range addrs {
		a = a.Unmap()
		slot, network := steerSlot(a)
		if p.listeners[slot] != nil {
			continue
		}
		ln, err := lc.Listen(context.Background(), network, netip.AddrPortFrom(a.WithZone(""), 0).String())
		if err != nil {
			return nil, fmt.Errorf("sk_lookup data plane: listen on %s: %w", a, err)
		}
		p.listeners[slot] = ln
	}
	if p.listeners[0] == nil && p.listeners[1] == nil {
		return nil, errors.New("sk_lookup data plane: no address to listen on")
	}

	spec, err := bpf.LoadSklookup()
	if err != nil {
		return nil, fmt.Errorf("sk_lookup data plane: %w", err)
	}
	spec.Maps[bpf.SklookupMapTetherPairs].MaxEntries = uint32(capacity)
	if err := spec.LoadAndAssign(&p.objs, nil); err != nil {
		return nil, bpfError("load the steering program and maps", err)
	}
	for slot, ln := range p.listeners {
		if ln == nil {
			continue
		}
		if err := putListener(p.objs.TetherSocks, uint32(slot), ln); err != nil {
			return nil, bpfError(fmt.Sprintf("put the listener on %s in the socket map", ln.Addr()), err)
		}
	}

	ns, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("sk_lookup data plane: open this thread's network namespace: %w", err)
	}
	defer ns.Close()
	if p.link, err = link.AttachNetNs(int(ns.Fd()), p.objs.TetherSteer); err != nil {
		return nil, bpfError("attach the steering program to the network namespace", err)
	}

	for _, ln := range p.listeners {
		if ln != nil {
			p.wg.Add(1)
			go p.serve(ln)
		}
	}
	return p, nil
}

// steerSlot is the socket map slot and the network of a's family.
func steerSlot(a netip.Addr) (slot uint32, network string) {
	if a.Is4() {
		return uint32(bpf.SklookupSteerSocketSTEER_SOCKET_IPV4), "tcp4"
	}
	return uint32(bpf.SklookupSteerSocketSTEER_SOCKET_IPV6), "tcp6"
}

func putListener(m *ebpf.Map, slot uint32, ln net.Listener) error {
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	if err := rc.Control(func(fd uintptr) { perr = m.Put(slot, uint64(fd)) }); err != nil {
		return err
	}
	return perr
}

// bpfError says what failed, with the capability hint for EPERM in place
// of cilium/ebpf's (which points at MEMLOCK).
func bpfError(what string, err error) error {
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("sk_lookup data plane: %s: %w (%s)", what, unix.EPERM, errNeedsCaps)
	}
	return fmt.Errorf("sk_lookup data plane: %s: %w", what, err)
}

func (p *skLookupPlane) Name() string { return DataPlaneSKLookup }

// steerKey is at as the program looks it up: the address as 16 bytes
// (IPv4 v4-mapped) in network order, the port in host order.
func steerKey(at netip.AddrPort) bpf.SklookupSteerKey {
	b := at.Addr().As16()
	var k bpf.SklookupSteerKey
	for i := range k.Addr {
		// The kernel compares the key's bytes: each word must lie in
		// memory in network order, whatever the host's byte order.
		k.Addr[i] = binary.NativeEndian.Uint32(b[4*i : 4*i+4])
	}
	k.Port = at.Port()
	return k
}

// Open steers at to the listener of its family: one map update.
func (p *skLookupPlane) Open(at netip.AddrPort) error {
	at = netip.AddrPortFrom(at.Addr().Unmap().WithZone(""), at.Port())
	if at.Port() == 0 {
		return fmt.Errorf("steer %s: port 0 cannot be steered", at)
	}
	slot, _ := steerSlot(at.Addr())
	if p.listeners[slot] == nil {
		return fmt.Errorf("steer %s: the sk_lookup data plane has no listener of that address family (it was built for the advertise addresses it was given)", at)
	}
	key := steerKey(at)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errPlaneClosed
	}
	if _, open := p.pairs[at]; open {
		return fmt.Errorf("steer %s: already open", at)
	}
	if err := p.objs.TetherPairs.Update(&key, slot, ebpf.UpdateNoExist); err != nil {
		// A full hash map says E2BIG (htab's count over max_entries).
		if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) {
			return fmt.Errorf("steer %s: steering map full: %d pairs", at, p.capacity)
		}
		return fmt.Errorf("steer %s: update the steering map: %w", at, err)
	}
	p.pairs[at] = &steeredPair{}
	return nil
}

// Release stops steering at: a new connection to it is refused at once,
// and one already queued on the listener is reset when accepted.
func (p *skLookupPlane) Release(at netip.AddrPort) {
	at = netip.AddrPortFrom(at.Addr().Unmap().WithZone(""), at.Port())
	key := steerKey(at)
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, open := p.pairs[at]; !open || p.closed {
		return
	}
	delete(p.pairs, at)
	if err := p.objs.TetherPairs.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		// Cannot happen short of a kernel bug; the pair would keep being
		// steered and its connections reset, since it is forgotten here.
		p.log.Error("sk_lookup data plane: delete a released pair from the steering map", "at", at.String(), "err", err)
	}
}

// serve accepts on one listener and hands each connection to the handler
// with its pair, the address and port the client dialed.
func (p *skLookupPlane) serve(ln net.Listener) {
	defer p.wg.Done()
	acceptEach(ln, p.log, "accept", p.claim, "listener", ln.Addr().String())
}

// claim hands an accepted connection to the handler of the pair it was
// dialed at, or resets it when that pair is no longer open.
func (p *skLookupPlane) claim(c net.Conn) {
	at := dialedPair(c)
	if hook := p.claimHook.Load(); hook != nil {
		(*hook)(at)
	}
	p.mu.RLock()
	pair := p.pairs[at]
	p.mu.RUnlock()
	if pair == nil {
		// Steered while its pair was open, released before we got
		// here: refuse it as a closed listener would have.
		p.unclaimed.Add(1)
		relay.Reset(c)
		_ = c.Close()
		return
	}
	load := connLoad{pair: pair.active.Add(1), total: p.active.Add(1)}
	go func() {
		defer func() {
			pair.active.Add(-1)
			p.active.Add(-1)
		}()
		p.handler(at, c, load)
	}()
}

// dialedPair is the (address, port) the client connected to: a steered
// connection's local address is the pair, not the listener's.
func dialedPair(c net.Conn) netip.AddrPort {
	ta, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	ap := ta.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}

// Close detaches the program (new connections to any pair are refused
// from then on), closes the listeners and waits for the accept loops.
// Like the per-port plane it does not wait for the handlers: the PS's
// drain waits for its in-flight connections itself, after Close.
func (p *skLookupPlane) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.pairs = map[netip.AddrPort]*steeredPair{}
	p.mu.Unlock()
	return p.teardown()
}

// teardown releases what construction acquired, in the order that
// refuses new connections first.
func (p *skLookupPlane) teardown() error {
	var errs []error
	if p.link != nil {
		if err := p.link.Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach the steering program: %w", err))
		}
	}
	for _, ln := range p.listeners {
		if ln != nil {
			_ = ln.Close()
		}
	}
	p.wg.Wait()
	if err := p.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close the steering program and maps: %w", err))
	}
	return errors.Join(errs...)
}

// counters reads the program's counters, summed over CPUs: SYNs steered to
// a listener, and SYNs of open pairs it could not assign (which should
// never happen: the listener was missing, or the kernel refused it).
func (p *skLookupPlane) counters() (steered, assignFailed uint64, err error) {
	read := func(which bpf.SklookupSteerCounter) (uint64, error) {
		var perCPU []uint64
		if err := p.objs.TetherSteerCt.Lookup(uint32(which), &perCPU); err != nil {
			return 0, fmt.Errorf("read the steering counters: %w", err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		return sum, nil
	}
	if steered, err = read(bpf.SklookupSteerCounterSTEER_STEERED); err != nil {
		return 0, 0, err
	}
	if assignFailed, err = read(bpf.SklookupSteerCounterSTEER_ASSIGN_FAILED); err != nil {
		return 0, 0, err
	}
	return steered, assignFailed, nil
}

// openPairs is how many pairs are steered now.
func (p *skLookupPlane) openPairs() int {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.pairs)
}

// unclaimedResets is how many steered connections were reset because
// their pair was released between the SYN and the accept.
func (p *skLookupPlane) unclaimedResets() uint64 { return p.unclaimed.Load() }

var _ dataPlane = (*skLookupPlane)(nil)

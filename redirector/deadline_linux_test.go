package redirector

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-net/tether/registry"
)

// fakeLeases is a lease reader whose answer the test sets.
type fakeLeases struct {
	mu     sync.Mutex
	leases map[string]registry.PSLease
	err    error
}

func (f *fakeLeases) PSLeases(context.Context) (map[string]registry.PSLease, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leases, f.err
}

func (f *fakeLeases) set(leases map[string]registry.PSLease, err error) {
	f.mu.Lock()
	f.leases, f.err = leases, err
	f.mu.Unlock()
}

func deadlineMap(t *testing.T) *ebpf.Map {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating a BPF map needs root")
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 8, MaxEntries: 16})
	if err != nil {
		t.Fatalf("create a hash map like tether_ps_deadline: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func deadlineOf(t *testing.T, m *ebpf.Map, addr string) (time.Duration, bool) {
	t.Helper()
	k := be32(netip.MustParseAddr(addr))
	var v uint64
	if err := m.Lookup(&k, &v); err != nil {
		return 0, false
	}
	return time.Duration(int64(v) - monotonicNow()), true
}

// While the registry cannot be read, the deadlines of the PS addresses live
// at the last read keep moving forward (now + grace), a PS dead at that read
// is not revived, the outage is reported once, and /healthz stays healthy.
func TestDeadlinesKeepExtendingWhileTheRegistryIsUnreachable(t *testing.T) {
	m := deadlineMap(t)
	const grace = 2 * time.Second
	synced := make(chan struct{})
	close(synced)
	reader := &fakeLeases{}
	d := &psDeadlines{m: m, reg: reader, grace: grace, log: slog.New(slog.NewTextHandler(io.Discard, nil)), synced: synced}
	now := time.Now()
	reader.set(map[string]registry.PSLease{
		"ps1": {ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: now.Add(time.Second)},
		"ps2": {ID: "ps2", Addr: netip.MustParseAddr("127.0.0.2"), State: registry.PSActive, ExpiresAt: now.Add(-time.Second)},
	}, nil)
	if err := d.refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	d.lastOK.Store(time.Now().UnixNano())
	first, ok := deadlineOf(t, m, "127.0.0.1")
	if !ok || first < grace || first > grace+time.Second {
		t.Fatalf("deadline of the live PS after a read: %v (present %v), want lease + grace", first, ok)
	}
	dead, _ := deadlineOf(t, m, "127.0.0.2")

	reader.set(nil, errors.New("dial tcp 127.0.0.1:6379: connect: connection refused"))
	// Longer than the lease plus the grace: without the keep-alive the
	// live PS's deadline would have passed.
	for range 8 {
		time.Sleep(grace / 4)
		if err := d.refresh(context.Background()); err != nil {
			t.Fatalf("a failed lease read must not fail the refresh: %v", err)
		}
		d.lastOK.Store(time.Now().UnixNano())
		left, ok := deadlineOf(t, m, "127.0.0.1")
		if !ok || left < grace-200*time.Millisecond {
			t.Fatalf("deadline of the live PS during the outage: %v left (present %v), want about the grace %v", left, ok, grace)
		}
	}
	if again, _ := deadlineOf(t, m, "127.0.0.2"); again > dead+50*time.Millisecond {
		t.Fatalf("a PS dead at the last read was extended during the outage: %v -> %v", dead, again)
	}
	if d.outage() < grace {
		t.Fatalf("outage reported as %v, want about %v", d.outage(), 2*grace)
	}
	if err := d.healthy(); err != nil {
		t.Fatalf("a registry outage alone must not fail /healthz: %v", err)
	}

	// The registry returns: the leases rule again (ps1 renewed).
	reader.set(map[string]registry.PSLease{
		"ps1": {ID: "ps1", Addr: netip.MustParseAddr("127.0.0.1"), State: registry.PSActive, ExpiresAt: time.Now().Add(5 * time.Second)},
	}, nil)
	if err := d.refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	if left, _ := deadlineOf(t, m, "127.0.0.1"); left < 5*time.Second {
		t.Fatalf("deadline after the registry returned: %v, want lease + grace", left)
	}
	if d.outage() != 0 {
		t.Fatalf("outage still reported after a successful read: %v", d.outage())
	}
}

// A redirector that starts while the registry is down keeps the deadlines
// its predecessor left that have not passed yet, and lets passed ones be.
func TestDeadlinesKeptAcrossARestartDuringAnOutage(t *testing.T) {
	m := deadlineMap(t)
	const grace = 2 * time.Second
	put := func(addr string, in time.Duration) {
		k := be32(netip.MustParseAddr(addr))
		v := uint64(monotonicNow() + int64(in))
		if err := m.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	put("127.0.0.1", 500*time.Millisecond)
	put("127.0.0.2", -time.Second)
	reader := &fakeLeases{err: errors.New("connection refused")}
	d := &psDeadlines{m: m, reg: reader, grace: grace, log: slog.New(slog.NewTextHandler(io.Discard, nil)), synced: make(chan struct{})}
	if err := d.refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	if left, _ := deadlineOf(t, m, "127.0.0.1"); left < grace-200*time.Millisecond {
		t.Fatalf("predecessor's live deadline not extended: %v left", left)
	}
	if left, _ := deadlineOf(t, m, "127.0.0.2"); left > 0 {
		t.Fatalf("a passed deadline was revived: %v left", left)
	}
}

// A PS that advertises several addresses has backends on each of them:
// every one gets the lease's deadline, not only the primary.
func TestEveryAdvertisedAddressGetsItsPSDeadline(t *testing.T) {
	m := deadlineMap(t)
	const grace = 2 * time.Second
	synced := make(chan struct{})
	close(synced)
	reader := &fakeLeases{}
	d := &psDeadlines{m: m, reg: reader, grace: grace, log: slog.New(slog.NewTextHandler(io.Discard, nil)), synced: synced}
	primary, second := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")
	reader.set(map[string]registry.PSLease{
		"ps1": {ID: "ps1", Addr: primary, Addrs: []netip.Addr{primary, second}, State: registry.PSActive, ExpiresAt: time.Now().Add(time.Minute)},
	}, nil)
	if err := d.refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"127.0.0.1", "127.0.0.2"} {
		if left, ok := deadlineOf(t, m, a); !ok || left < time.Minute {
			t.Errorf("deadline of PS address %s: %v (present %v), want the lease's minute + grace", a, left, ok)
		}
	}
	if _, ok := deadlineOf(t, m, "127.0.0.3"); ok {
		t.Errorf("an address the lease does not advertise got a deadline")
	}
}

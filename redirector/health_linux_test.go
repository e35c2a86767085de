package redirector

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/testutil"
)

// healthDialTimeout bounds a connect of the health tests: a refused one
// fails at once, a live one answers in microseconds.
const healthDialTimeout = 3 * time.Second

// healthInstall installs the programs into a fresh test cgroup with no
// daemon (the tests write the route map themselves) and sets the hold-down.
func healthInstall(t *testing.T, mapSize uint32, hold time.Duration) (*testutil.Cgroup, *Installation) {
	t.Helper()
	testutil.RequirePrivileged(t)
	cg := testutil.NewCgroup(t)
	pin := filepath.Join("/sys/fs/bpf", testutil.UniqueName("th"))
	in, err := Install(pin, cg.Path, mapSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		if err := Uninstall(pin); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	if err := in.SetSuspectHold(hold); err != nil {
		t.Fatal(err)
	}
	return cg, in
}

// putBackends writes target -> live backends into the route map.
func putBackends(t *testing.T, in *Installation, target netip.AddrPort, backends ...netip.AddrPort) {
	t.Helper()
	k, _ := EncodeKey(target)
	var v bpf.RedirectRouteValue
	for i, b := range backends {
		v.Backends[i] = bpf.RedirectBackend{Addr: be32(b.Addr()), Port: be16(b.Port()), State: uint8(bpf.RedirectBackendStateBACKEND_LIVE)}
	}
	if err := in.objs.TetherRoutes.Put(&k, &v); err != nil {
		t.Fatalf("write route %s: %v", target, err)
	}
}

// acceptAndClose listens on 127.0.0.1 and closes what it accepts.
func acceptAndClose(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// closedPort is a 127.0.0.1 port nothing listens on: a SYN to it gets a RST.
func closedPort(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

// silentListener is a 127.0.0.1 listener that drops SYNs: backlog 0 and
// one connection left unaccepted fill its accept queue, and Linux drops a
// SYN to a listener whose accept queue is full. A connect to it stays in
// SYN_SENT, as to a host that vanished.
func silentListener(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port))
	// Fill the queue (from outside the cgroup: never redirected) until a
	// connect times out: from then on SYNs are dropped.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", ap.String(), 300*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
		if i == 5 {
			t.Fatal("the backlog-0 listener keeps accepting connections; cannot build a backend that drops SYNs")
		}
	}
	return ap
}

// healthDial runs the test binary in cg as a client (HealthClientMain)
// that dials addr n times, each with timeout, and returns (ok, failed).
func healthDial(t *testing.T, cg *testutil.Cgroup, addr netip.AddrPort, n int, timeout time.Duration) (int, int) {
	t.Helper()
	out := runHealthClient(t, cg, fmt.Sprintf("dial,%s,%d,%d", addr, n, timeout.Milliseconds()))
	var ok, failed int
	if _, err := fmt.Sscanf(out, "ok=%d failed=%d", &ok, &failed); err != nil {
		t.Fatalf("client output %q: %v", out, err)
	}
	return ok, failed
}

func runHealthClient(t *testing.T, cg *testutil.Cgroup, spec string) string {
	t.Helper()
	return RunClient(t, cg, "health", spec, "result ", time.Minute)
}

// HealthClientMain is the client the health tests start inside their
// cgroup:
//
//	dial,ADDR,N,TIMEOUT_MS  N connects one after the other, each closed at
//	                        once; prints "result ok=X failed=Y"
//	hold,FILE               connects to every address in FILE, prints
//	                        "result held=X failed=Y", and keeps them open
//	                        until killed
func HealthClientMain(spec string) int {
	f := strings.Split(spec, ",")
	switch f[0] {
	case "dial":
		n, _ := strconv.Atoi(f[2])
		ms, _ := strconv.Atoi(f[3])
		ok, failed := 0, 0
		for range n {
			c, err := net.DialTimeout("tcp", f[1], time.Duration(ms)*time.Millisecond)
			if err != nil {
				failed++
				continue
			}
			c.Close()
			ok++
		}
		fmt.Printf("result ok=%d failed=%d\n", ok, failed)
		return 0
	case "hold":
		b, err := os.ReadFile(f[1])
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		var conns []net.Conn
		failed := 0
		for _, a := range strings.Fields(string(b)) {
			c, err := net.DialTimeout("tcp", a, 3*time.Second)
			if err != nil {
				failed++
				continue
			}
			conns = append(conns, c)
		}
		fmt.Printf("result held=%d failed=%d\n", len(conns), failed)
		time.Sleep(time.Minute) // the test kills the cgroup when done
		return 0
	}
	return 2
}

func (in *Installation) healthCounter(t *testing.T, name string) uint64 {
	t.Helper()
	c, err := healthCounters(in.objs.TetherHealthCounters)
	if err != nil {
		t.Fatal(err)
	}
	return c[name]
}

// suspectMark is when b was marked suspect (0: not marked).
func (in *Installation) suspectMark(t *testing.T, b netip.AddrPort) uint64 {
	t.Helper()
	k, _ := EncodeKey(b)
	var at uint64
	if err := in.objs.TetherSuspect.Lookup(&k, &at); err != nil {
		return 0
	}
	return at
}

// One backend refuses (RST to the SYN), the other is live: after the
// first refused connect the program stops picking the refusing backend
// until the hold-down lapses, then tries it once more. Without passive
// health (hold-down 0) half the connects fail: the control that shows the
// test can fail.
func TestPassiveHealthAvoidsARefusingBackendUntilTheHoldDownLapses(t *testing.T) {
	const hold = 2 * time.Second
	cg, in := healthInstall(t, 100, hold)
	live, dead := acceptAndClose(t), closedPort(t)
	target := netip.MustParseAddrPort("127.77.0.31:9100")
	putBackends(t, in, target, live, dead)

	ok, failed := healthDial(t, cg, target, 200, healthDialTimeout)
	t.Logf("FIGURE passive_health_back_to_back: 200 connects, one live and one refusing backend: ok=%d failed=%d", ok, failed)
	if failed < 1 || failed > 2 || ok+failed != 200 {
		t.Fatalf("want 1-2 failed connects out of 200 (the first that picked the refusing backend), got ok=%d failed=%d", ok, failed)
	}
	if in.suspectMark(t, dead) == 0 || in.suspectMark(t, live) != 0 {
		t.Fatalf("the suspect map must hold the refusing backend %s and not the live %s", dead, live)
	}
	refused, avoided := in.healthCounter(t, "marked_refused"), in.healthCounter(t, "avoided")
	if refused < 1 || avoided < 150 {
		t.Fatalf("counters: marked_refused=%d avoided=%d (want >= 1 and >= 150)", refused, avoided)
	}
	st, err := readHealthStatus(in.PinDir)
	if err != nil || st == nil || st.Hold != hold.String() || st.Marked != 1 || st.Avoided != 1 || st.Suspects[0].Backend != dead.String() {
		t.Fatalf("status: %+v %v", st, err)
	}

	// After the hold-down the refusing backend gets a connect again; it
	// fails once more and is marked anew.
	first := in.suspectMark(t, dead)
	time.Sleep(hold + 200*time.Millisecond)
	ok, failed = healthDial(t, cg, target, 20, healthDialTimeout)
	if failed < 1 || failed > 2 {
		t.Fatalf("after the hold-down: want the refusing backend tried again (1-2 failures of 20), got ok=%d failed=%d", ok, failed)
	}
	if in.healthCounter(t, "retried_after_hold") < 1 || in.suspectMark(t, dead) <= first {
		t.Fatalf("after the hold-down: retried_after_hold=%d, mark %d -> %d", in.healthCounter(t, "retried_after_hold"), first, in.suspectMark(t, dead))
	}

	// Hold-down 0: nothing is avoided, about half the connects fail.
	if err := in.SetSuspectHold(0); err != nil {
		t.Fatal(err)
	}
	ok, failed = healthDial(t, cg, target, 40, healthDialTimeout)
	if failed < 5 {
		t.Fatalf("with passive health off, want many of 40 connects refused, got ok=%d failed=%d", ok, failed)
	}
}

// A backend that drops SYNs: an application that gives up its own pending
// connect before the first SYN retransmit closes the socket with no error,
// which says nothing about the backend and must not mark it; a connect
// that waits past the first retransmit (about 1 s) marks it.
func TestPassiveHealthMarksASilentBackendOnItsRTOButNotOnTheClientsOwnTimeout(t *testing.T) {
	cg, in := healthInstall(t, 100, 5*time.Second)
	silent := silentListener(t)
	target := netip.MustParseAddrPort("127.77.0.32:9100")
	putBackends(t, in, target, silent)

	ok, failed := healthDial(t, cg, target, 3, 200*time.Millisecond)
	if ok != 0 || failed != 3 {
		t.Fatalf("connects to a backend that drops SYNs: ok=%d failed=%d, want 3 timeouts", ok, failed)
	}
	if at := in.suspectMark(t, silent); at != 0 || in.healthCounter(t, "marked_refused")+in.healthCounter(t, "marked_timeout") != 0 {
		t.Fatalf("the client's own connect timeout marked the backend (mark %d, counters refused=%d timeout=%d)",
			at, in.healthCounter(t, "marked_refused"), in.healthCounter(t, "marked_timeout"))
	}

	start := time.Now()
	if ok, _ := healthDial(t, cg, target, 1, 1600*time.Millisecond); ok != 0 {
		t.Fatal("a connect to a backend that drops SYNs succeeded")
	}
	if in.suspectMark(t, silent) == 0 || in.healthCounter(t, "marked_timeout") < 1 {
		t.Fatalf("a connect left without a SYN-ACK past its first retransmit did not mark the backend (marked_timeout=%d)", in.healthCounter(t, "marked_timeout"))
	}
	t.Logf("silent backend marked by the SYN retransmit of a connect with a 1.6 s timeout (client ran %v)", time.Since(start).Round(time.Millisecond))
}

// More dead backends than tether_dead holds (1,024): every established
// redirected socket to them is destroyed by one Destroy call, in chunks,
// even with the map left full of stale marks by an earlier pass.
func TestDestroyHandlesMoreDeadBackendsThanTheDeadMapHolds(t *testing.T) {
	const nSockets, nExtra = 2000, 500 // extra: dead backends without sockets
	cg, in := healthInstall(t, 4*(nSockets+nExtra), 0)

	// One listener per backend; each accepted connection reports when it
	// ends (the client's socket destroyed: a RST).
	type ended struct{ at time.Time }
	endedCh := make(chan ended, nSockets)
	var acceptedWG sync.WaitGroup
	acceptedWG.Add(nSockets)
	var targets []string
	var backends []netip.AddrPort
	for i := range nSockets {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listener %d: %v", i, err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			acceptedWG.Done()
			defer c.Close()
			_, _ = io.Copy(io.Discard, c)
			endedCh <- ended{time.Now()}
		}()
		b := ln.Addr().(*net.TCPAddr).AddrPort()
		tg := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 77, byte(10 + i/250), byte(1 + i%250)}), 9100)
		putBackends(t, in, tg, b)
		targets = append(targets, tg.String())
		backends = append(backends, b)
	}
	for i := range nExtra {
		backends = append(backends, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 78, byte(i / 250), byte(1 + i%250)}), 9))
	}

	list := filepath.Join(t.TempDir(), "targets")
	if err := os.WriteFile(list, []byte(strings.Join(targets, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$", "hold,"+list)
	cmd.Env = append(os.Environ(), "TETHER_TEST_CLIENT=health")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	done := cg.Command(t, cmd)
	err = cmd.Start()
	done()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	held := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "result ") {
				held <- sc.Text()
			}
		}
		close(held)
	}()
	select {
	case line := <-held:
		if line != fmt.Sprintf("result held=%d failed=0", nSockets) {
			t.Fatalf("client: %s", line)
		}
	case <-time.After(time.Minute):
		t.Fatal("the client did not open its connections within a minute")
	}
	waitGroup(t, &acceptedWG, 10*time.Second, "every client connection accepted")

	// Stale marks from a pass that never cleared them fill the map.
	one := uint8(1)
	for i := range int(in.objs.TetherDead.MaxEntries()) {
		k, _ := EncodeKey(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 79, byte(i / 250), byte(1 + i%250)}), 9))
		if err := in.objs.TetherDead.Put(&k, &one); err != nil {
			t.Fatalf("stale mark %d: %v", i, err)
		}
	}

	d := newDestroyer(in.PinDir, false, slog.New(slog.NewTextHandler(testWriter{t}, nil)))
	defer d.Close()
	if _, ok := d.(*iterDestroyer); !ok {
		t.Fatal("bpf_sock_destroy is not available on this kernel: this test is about the iterator path")
	}
	start := time.Now()
	n, err := d.Destroy(context.Background(), backends)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	t.Logf("FIGURE destroy_2000_sockets: %d sockets of %d dead backends destroyed in %v (tether_dead holds %d)", n, len(backends), took, in.objs.TetherDead.MaxEntries())
	if n != nSockets {
		t.Fatalf("destroyed %d sockets, want %d", n, nSockets)
	}
	if took > time.Second {
		t.Fatalf("Destroy took %v, want all sockets destroyed within 1 s", took)
	}
	// The peers see the RST of every destroyed socket.
	var last time.Time
	deadline := time.After(5 * time.Second)
	for i := range nSockets {
		select {
		case e := <-endedCh:
			if e.at.After(last) {
				last = e.at
			}
		case <-deadline:
			t.Fatalf("only %d of %d server-side connections ended after Destroy", i, nSockets)
		}
	}
	t.Logf("FIGURE destroy_2000_sockets: last server-side connection ended %v after the Destroy call began", last.Sub(start).Round(time.Millisecond))
	if last.Sub(start) > time.Second {
		t.Fatalf("the last connection ended %v after Destroy began, want within 1 s", last.Sub(start))
	}
	var k bpf.RedirectRouteKey
	var v uint8
	if in.objs.TetherDead.Iterate().Next(&k, &v) {
		t.Fatalf("tether_dead still holds %s after Destroy", DecodeKey(k))
	}
}

func waitGroup(t *testing.T, wg *sync.WaitGroup, timeout time.Duration, what string) {
	t.Helper()
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
	case <-time.After(timeout):
		t.Fatalf("%s: not within %v", what, timeout)
	}
}

// testWriter sends a logger's lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

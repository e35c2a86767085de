package registry_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/redisproc"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/registry"
)

// exampleRedisURL is the redis-server TestMain starts for the examples; in
// real use it is your Redis, e.g. redis://10.0.0.5:6379/0.
var exampleRedisURL string

// TestMain starts one throwaway redis-server for the examples (the tests
// start their own, one per test). Without redis-server the examples are
// skipped, or fail the run under TETHER_TEST_PRIVILEGED=1 like every test
// that needs a program.
func TestMain(m *testing.M) {
	flag.Parse()
	srv, err := redisproc.Start(context.Background(), redisproc.Options{})
	switch {
	case err == nil:
		exampleRedisURL = srv.URL()
	case errors.Is(err, redisproc.ErrNotInstalled) && os.Getenv(testutil.PrivilegedEnv) != "1":
		fmt.Fprintln(os.Stderr, "registry: examples skipped:", err)
		skip := "^Example"
		if cur := flag.Lookup("test.skip").Value.String(); cur != "" {
			skip = cur + "|" + skip
		}
		_ = flag.Set("test.skip", skip)
	default:
		fmt.Fprintln(os.Stderr, "registry: start redis-server for the examples:", err)
		os.Exit(1)
	}
	code := m.Run()
	if srv != nil {
		if err := srv.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "registry: stop redis-server:", err)
		}
	}
	os.Exit(code)
}

// publishExample plays the PS nodes' part for an example: it renews a
// lease for every PS id in ps (id -> PS address) and publishes target on
// each at port.
func publishExample(target netip.AddrPort, port uint16, ps map[string]netip.Addr) {
	reg, err := registry.New(registry.Config{URL: exampleRedisURL})
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	ctx := context.Background()
	for id, addr := range ps {
		l := registry.PSLease{ID: id, Addr: addr, State: registry.PSActive, TTL: time.Minute}
		if err := reg.RenewPS(ctx, l); err != nil {
			log.Fatal(err)
		}
		errs, err := reg.Publish(ctx, id, []registry.Publication{{Target: target, Port: port, AgentID: "a1"}})
		if err = errors.Join(append(errs, err)...); err != nil {
			log.Fatal(err)
		}
	}
}

// A Go program that cannot use the eBPF redirector resolves an agent's
// address itself: one Get for a one-off dial.
func ExampleRegistry_Get() {
	// Stand-ins for the example: a PS port on this host, and its route.
	psPort, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer psPort.Close()
	go func() {
		for c, err := psPort.Accept(); err == nil; c, err = psPort.Accept() {
			c.Close()
		}
	}()
	publishExample(netip.MustParseAddrPort("198.18.1.11:8080"), uint16(psPort.Addr().(*net.TCPAddr).Port),
		map[string]netip.Addr{"ps1": netip.MustParseAddr("127.0.0.1")})

	reg, err := registry.New(registry.Config{URL: exampleRedisURL})
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()

	route, err := reg.Get(ctx, netip.MustParseAddrPort("198.18.1.11:8080"))
	if errors.Is(err, registry.ErrNotFound) {
		log.Fatal("no live route to the agent")
	}
	if err != nil {
		log.Fatal(err)
	}
	// Every backend Get returns is live; pick any, try the next on failure.
	b := route.Backends[rand.IntN(len(route.Backends))]
	conn, err := net.DialTimeout("tcp", b.Address.String(), 2*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	fmt.Println("connected to", route.Target, "through", b.PSID)
	// Output:
	// connected to 198.18.1.11:8080 through ps1
}

// A long-running program keeps a Mirror: an in-memory table that follows
// the change feed, expires leases locally and repairs itself; lookups are
// memory reads.
func ExampleMirror() {
	// Stand-in for the example: the route the PS nodes would publish.
	publishExample(netip.MustParseAddrPort("198.18.1.12:8080"), 20001, map[string]netip.Addr{
		"ps1": netip.MustParseAddr("198.18.0.21"),
		"ps2": netip.MustParseAddr("198.18.0.22"),
	})

	reg, err := registry.New(registry.Config{URL: exampleRedisURL})
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	m, err := registry.NewMirror(registry.MirrorConfig{Registry: reg})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	defer func() { cancel(); <-done }()
	<-m.Ready()

	backends, ok := m.Lookup(netip.MustParseAddrPort("198.18.1.12:8080"))
	if !ok {
		log.Fatal("no route")
	}
	for _, b := range backends {
		if b.Live {
			fmt.Println("live backend", b.Address, "on", b.PSID)
		}
	}
	// Output:
	// live backend 198.18.0.21:20001 on ps1
	// live backend 198.18.0.22:20001 on ps2
}

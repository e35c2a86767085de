package registry_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"

	"github.com/tether-net/tether/registry"
)

// A Go program that cannot use the eBPF redirector resolves an agent's
// address itself: one Get for a one-off dial.
func ExampleRegistry_Get() {
	reg, err := registry.New(registry.Config{URL: "redis://10.0.0.5:6379/0"})
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
}

// A long-running program keeps a Mirror: an in-memory table that follows
// the change feed, expires leases locally and repairs itself; lookups are
// memory reads.
func ExampleMirror() {
	reg, err := registry.New(registry.Config{URL: "redis://10.0.0.5:6379/0"})
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	m, err := registry.NewMirror(registry.MirrorConfig{Registry: reg})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.Run(ctx)
	<-m.Ready()

	backends, ok := m.Lookup(netip.MustParseAddrPort("198.18.1.11:8080"))
	if !ok {
		log.Fatal("no route")
	}
	for _, b := range backends {
		if b.Live {
			fmt.Println("live backend", b.Address, "on", b.PSID)
		}
	}
}

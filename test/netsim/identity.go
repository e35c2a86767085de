package netsim

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// IdentityEnv, set to "ADDR=NAME", turns a program that calls
// MaybeServeIdentity first thing into a tiny HTTP server on ADDR that answers
// every request with "NAME\n": the service each simulated host runs, so that
// every response tells which host it came from.
const IdentityEnv = "TETHER_NETSIM_IDENTITY"

// MaybeServeIdentity serves forever when IdentityEnv is set, and returns at
// once otherwise. Tests call it from TestMain, the demo from main, and start
// themselves (os.Executable) as the host's service.
func MaybeServeIdentity() {
	spec := os.Getenv(IdentityEnv)
	if spec == "" {
		return
	}
	addr, name, ok := strings.Cut(spec, "=")
	if !ok {
		fmt.Fprintf(os.Stderr, "%s=%q: want ADDR=NAME\n", IdentityEnv, spec)
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "identity server:", err)
		os.Exit(1)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			fmt.Fprintf(w, "%s\n", name)
		}),
		// A client that stalls cannot hold a connection forever.
		ReadHeaderTimeout: 5 * time.Second,
		WriteTimeout:      5 * time.Second,
		IdleTimeout:       5 * time.Second,
	}
	err = srv.Serve(ln)
	fmt.Fprintln(os.Stderr, "identity server:", err)
	os.Exit(1)
}

// IdentityEnvFor is the environment entry that makes a host's service
// answer name on addr.
func IdentityEnvFor(addr, name string) string { return IdentityEnv + "=" + addr + "=" + name }

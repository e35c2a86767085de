// Command tether is the single binary of tether: the proxy server (ps), the
// agent, the eBPF redirector, the SOCKS5/HTTP proxy, and the operators'
// inspection commands (routes).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// cmd owns the signal handling: SIGINT/SIGTERM cancel the context every
	// daemon's Run takes, and each daemon shuts down gracefully from there.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tether:", err)
		os.Exit(1)
	}
}

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
	// Once the first signal started the graceful stop, the default action
	// comes back: a second SIGINT/SIGTERM ends a drain at once.
	context.AfterFunc(ctx, stop)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tether:", err)
		os.Exit(1)
	}
}

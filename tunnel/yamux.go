package tunnel

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/hashicorp/yamux"
)

// Session timing and sizing shared by both ends of a tunnel.
const (
	// WriteTimeout bounds how long a frame may wait to be written, and how
	// long a ping waits for its answer. A silent peer is noticed much
	// sooner by the liveness watchdog (liveness.go, DefaultDeadAfter).
	WriteTimeout = 5 * time.Second
	// DefaultStreamWindow is the largest receive window per stream. yamux's
	// default 256 KiB caps one stream at 256 KiB per round trip; test/bench/
	// tunnel measured 1, 4 and 16 MiB, see SPEC.md.
	DefaultStreamWindow = 4 << 20
	// acceptBacklog bounds streams opened and not yet accepted (and SYNs in
	// flight): enough for bursts of new connections.
	acceptBacklog = 1024
)

// yamuxConfig builds the yamux configuration for both ends. window is the
// per-stream receive window (0 = DefaultStreamWindow).
func yamuxConfig(log *slog.Logger, window uint32) *yamux.Config {
	if window == 0 {
		window = DefaultStreamWindow
	}
	c := yamux.DefaultConfig()
	c.AcceptBacklog = acceptBacklog
	// No yamux keepalive: it pings every interval whatever the traffic and
	// needs interval + write timeout to notice a dead peer. The liveness
	// watchdog pings only a quiet connection and counts any byte read as
	// life (liveness.go).
	c.EnableKeepAlive = false
	c.ConnectionWriteTimeout = WriteTimeout
	c.MaxStreamWindowSize = window
	// A slow agent must not tear down the whole session (yamux closes the
	// session when an open is not acknowledged in time); opens are bounded
	// per stream by openStream instead.
	c.StreamOpenTimeout = 0
	// Close is a half-close (FIN) in yamux, and yamux v0.1 has no public
	// reset: a stream we abort is freed on the peer only when this timer
	// sends the RST. It also bounds how long a half-closed stream may keep
	// receiving, so it stays at yamux's generous 5 minutes (see SPEC.md).
	c.StreamCloseTimeout = 5 * time.Minute
	c.LogOutput = nil
	if log == nil {
		c.LogOutput = io.Discard
	} else {
		c.Logger = yamuxLogger{log: log}
	}
	return c
}

// yamuxLogger sends yamux's log lines to slog at debug level: the owner of
// a session logs its outcome once, where it handles it.
type yamuxLogger struct{ log *slog.Logger }

func (l yamuxLogger) emit(msg string) { l.log.Debug("yamux", "msg", strings.TrimSpace(msg)) }

func (l yamuxLogger) Print(v ...any)                 { l.emit(fmt.Sprint(v...)) }
func (l yamuxLogger) Printf(format string, v ...any) { l.emit(fmt.Sprintf(format, v...)) }
func (l yamuxLogger) Println(v ...any)               { l.emit(fmt.Sprintln(v...)) }

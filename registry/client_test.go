package registry

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// A Redis that accepts connections but never answers: only the caller's
// deadline can end a call, not the 3s I/O timeouts.
func TestACallerDeadlineBoundsACallToARedisThatHangs(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // hold it open, say nothing
		}
	}()
	reg, err := New(Config{URL: "redis://" + ln.Addr().String() + "/0"})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := reg.Ping(ctx); err == nil {
		t.Fatal("ping of a silent server succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a 200ms deadline took %v to end the call: socket I/O ignores the ctx", d)
	}
}

// A nil Logger discards; it never borrows the process-wide default logger.
func TestANilLoggerDiscardsInsteadOfUsingTheDefault(t *testing.T) {
	var buf bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelWarn})))
	t.Cleanup(func() { slog.SetDefault(old) })

	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	m, err := NewMirror(MirrorConfig{Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	// Junk in the keyspace makes both warn.
	reg.rdb.SAdd(ctx, reg.keys.targets(), "not-a-target")
	if _, err := reg.List(ctx); err != nil {
		t.Fatal(err)
	}
	m.log.Warn("mirror warning")
	if strings.Contains(buf.String(), "not-a-target") || strings.Contains(buf.String(), "mirror warning") {
		t.Fatalf("a nil Logger wrote to slog.Default():\n%s", buf.String())
	}
}
